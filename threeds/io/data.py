"""Reading and writing records.

Every later stage sees one shape: a dict with `id` (str), `instruction`, `output`, `input` (only
if the source had it) and every other source field untouched. Bad records (a text that is blank
once whitespace and invisible characters are set aside, a CSV row with too many or too few cells)
go to a rejects list instead of stopping a long run; errors that make the whole file
untrustworthy (malformed JSON, duplicate ids) raise `DataError` with the position, so the user
can fix the file. Every reject's `index` is the record's 0-based position in the input file.

Everything written is strict JSON: a NaN or infinite number (say in a field passed through from
a Parquet file) is written as null, since `NaN` is not JSON and other tools refuse it.
"""

from __future__ import annotations

import csv
import decimal
import hashlib
import json
import math
import os
import random
import re
import stat
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from threeds.config import DataConfig, SubsetConfig, check_settings
from threeds.errors import ThreedsError
from threeds.io.atomic import atomic_write, make_parent

PathLike = str | os.PathLike

_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_HUMAN_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant"}
_SYSTEM_ROLE = "system"
_ALPACA_KEYS = {"id", "instruction", "input", "output"}
_REQUIRED = ("instruction", "output")
DUPLICATE_ID_POLICIES = ("error", "rename")


class DataError(ThreedsError, ValueError):
    """The input file cannot be trusted as a whole (bad syntax, duplicate ids, unknown format)."""


MAX_DEPTH = 64  # records are flat; a ShareGPT conversation nests 3 deep


@dataclass(frozen=True)
class Limits:
    """Bounds on what is read, checked before it is parsed, so a hostile file costs seconds and
    bounded memory: its size, a line's length (JSON Lines, a CSV cell), JSON nesting depth."""

    max_bytes: int = int(DataConfig.max_data_mb * 2**20)
    max_line: int = int(DataConfig.max_line_mb * 2**20)
    max_depth: int = MAX_DEPTH

    @classmethod
    def of(cls, config: DataConfig) -> Limits:
        return cls(int(config.max_data_mb * 2**20), int(config.max_line_mb * 2**20))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_records(
    path: PathLike, duplicate_ids: str = "error", limits: Limits | None = None
) -> tuple[list[dict], list[dict]]:
    """Read and normalise a dataset file; returns (records, rejects).

    The format follows the extension (.json, .jsonl/.ndjson, .parquet, .csv); a .json file
    holding JSON Lines is read as such. Rejects are `{"index", "id", "field", "reason"}` with
    `index` the 0-based position of the record in the file.

    Ids join every later output, so they must be unique. `duplicate_ids="error"` raises on a
    reused id; `"rename"` (for sources whose ids are known not to be unique, like MedQuAD's)
    keeps the first and renames later ones `<id>#2`, `<id>#3`, ... in file order, with a warning.
    """
    if duplicate_ids not in DUPLICATE_ID_POLICIES:
        raise ValueError(
            f"duplicate_ids must be one of {DUPLICATE_ID_POLICIES}, got {duplicate_ids!r}"
        )
    path = Path(path)
    escaped: set[int] = set()  # items whose JSON text escapes a UTF-16 surrogate (the only way to get a lone one)
    raw, where = _load_raw(path, limits or Limits(), escaped)
    _check_ids(path, raw, where)
    given = [_given_id(item) for item in raw]
    first_seen = _first_positions(path, given, where, duplicate_ids)
    records: list[dict] = []
    rejects: list[dict] = []
    unnamed: list[dict] = []
    repeated: list[dict] = []
    for index, (item, given_id) in enumerate(zip(raw, given)):
        rec, problem = _normalise(item)
        if problem is None and index in escaped:
            problem = _surrogate_problem(rec, where(index))
        if problem is not None:
            field, reason = problem
            rejects.append({"index": index, "id": given_id, "field": field, "reason": reason})
            continue
        if given_id is None:
            unnamed.append(rec)
        elif first_seen[given_id] != index:
            repeated.append(rec)
        records.append(rec)
    taken = set(first_seen)
    _rename_repeated(repeated, taken)
    _assign_hash_ids(unnamed, taken)
    return records, rejects


def read_data(path: PathLike, config: DataConfig) -> tuple[list[dict], list[dict]]:
    """`read_records` with a command's data settings (duplicate ids, size and line limits)."""
    return read_records(path, config.duplicate_ids, Limits.of(config))


def _first_positions(
    path: Path, given: list[str | None], where: Callable[[int], str], policy: str
) -> dict[str, int]:
    """Index of each given id's first occurrence; a reuse raises or is warned about."""
    first: dict[str, int] = {}
    reused: list[str] = []
    for index, given_id in enumerate(given):
        if given_id is None:
            continue
        if given_id not in first:
            first[given_id] = index
            continue
        message = f"duplicate id {given_id!r} at {where(first[given_id])} and {where(index)}"
        if policy == "error":
            raise DataError(f"{path}: {message} (fix the file, or pass --duplicate-ids rename to keep both)")
        reused.append(message)
    if reused:
        warnings.warn(
            f"{path}: {len(reused)} records reuse an earlier id (first: {reused[0]}); "
            "renamed <id>#2, <id>#3, ...",
            stacklevel=3,
        )
    return first


def require_fields(
    records: list[dict], fields: Iterable[str], positions: dict[str, int] | None = None
) -> tuple[list[dict], list[dict]]:
    """Split records into those whose `fields` are all non-blank strings and rejects.

    For later stages (e.g. `generated_output` must exist before scoring). `index` in a reject is
    the record's position in the input file, from `positions` (see `file_positions`), else its
    position in `records`.
    """
    fields = tuple(fields)
    kept: list[dict] = []
    rejects: list[dict] = []
    for index, rec in enumerate(records):
        problem = _first_problem(rec, fields)
        if problem is None:
            kept.append(rec)
        else:
            where = index if positions is None else positions.get(rec.get("id"), index)
            rejects.append(
                {"index": where, "id": rec.get("id"), "field": problem[0], "reason": problem[1]}
            )
    return kept, rejects


def file_positions(records: list[dict], rejects: list[dict]) -> dict[str, int]:
    """id -> 0-based position in the input file, for `read_records`'s full result: the records
    fill, in order, the positions its rejects do not take."""
    taken = {r["index"] for r in rejects}
    free = (i for i in range(len(records) + len(rejects)) if i not in taken)
    return {rec["id"]: position for rec, position in zip(records, free)}


def require_records(path: PathLike, records: list[dict], rejects: list[dict]) -> None:
    """Stop with one line when the input holds no usable record (empty, or every one rejected)."""
    if records:
        return
    if not rejects:
        raise DataError(f"{path}: no records (the file is empty)")
    first = rejects[0]
    raise DataError(f"{path}: all {len(rejects)} records were rejected; the first, at index {first['index']}: "
                    f"field {first['field']}: {first['reason']}")  # fmt: skip


def take_records(records: list[dict], subset: SubsetConfig) -> list[dict]:
    """A small run before the whole data: the first `limit` records, or `sample` records drawn at
    random with `sample_seed` (in their input order); all of them when neither is given."""
    check_settings(subset)  # limit and sample: at least 1, not both
    if subset.sample is not None and subset.sample < len(records):
        return [records[i] for i in sorted(random.Random(subset.sample_seed).sample(range(len(records)), subset.sample))]
    return records[: subset.limit] if subset.limit is not None else records


def full_instruction(rec: dict) -> str:
    """The user turn: instruction, then input after a newline (LlamaFactory's Alpaca rule)."""
    inp = rec.get("input")
    return f"{rec['instruction']}\n{inp}" if isinstance(inp, str) and inp else rec["instruction"]


def _load_raw(path: Path, limits: Limits, escaped: set[int]) -> tuple[list[Any], Any]:
    """Parse the file into raw items plus a function describing an item's position for errors;
    `escaped` gets the items whose text escapes a surrogate (Parquet and CSV text cannot hold one)."""
    suffix = path.suffix.lower()
    if suffix not in _JSONL_SUFFIXES | {".json", ".parquet", ".pq", ".csv", ".tsv"}:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl, .parquet, .csv)")
    checked_size(path, limits)
    if suffix in _JSONL_SUFFIXES:
        return _parse_jsonl(path, read_text(path, limits), limits, escaped)
    if suffix == ".json":
        return _load_json(path, limits, escaped)
    if suffix in {".parquet", ".pq"}:
        return _load_parquet(path), _index_position
    return _load_csv(path, "\t" if suffix == ".tsv" else ",", limits), _index_position


def _index_position(index: int) -> str:
    return f"index {index}"


def checked_size(path: Path, limits: Limits) -> int:
    """The size of `path` when it is a regular file within the limit. A FIFO or a device is refused
    at once: reading one blocks forever (a FIFO) or never ends (/dev/zero)."""
    info = os.stat(path)  # follows links: a link to /dev/zero is a device
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a plain file")
        raise DataError(f"{path}: not a regular file ({kind}); expected a data file")
    if info.st_size > limits.max_bytes:
        raise DataError(f"{path}: {_size(info.st_size)}, more than the limit of {_size(limits.max_bytes)} (--max-data-mb)")
    return info.st_size


def _size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:.1f} MB"


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def read_text(path: PathLike, limits: Limits | None = None) -> str:
    """The file's text (UTF-8, a BOM dropped): a regular file within the size limit, never read past
    it even if it grows meanwhile; DataError naming the file otherwise."""
    path, limits = Path(path), limits or Limits()
    size = checked_size(path, limits)
    with path.open("rb") as f:
        data = f.read(size + 1)  # not read(max_bytes + 1): Python allocates the buffer asked for, 2 GB by default
        if len(data) > size:  # it grew meanwhile: read on up to the limit
            data += f.read(limits.max_bytes + 1 - len(data))
    if len(data) > limits.max_bytes:
        raise DataError(f"{path}: more than the limit of {_size(limits.max_bytes)} (--max-data-mb)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from e


def nesting_problem(text: str, limit: int) -> str | None:
    """Why `text` nests JSON arrays/objects deeper than `limit`, checked before parsing it (a deep
    one makes the parser recurse until it fails); None when it does not."""
    if text.count("[") + text.count("{") <= limit:  # cannot nest deeper than it has brackets
        return None
    brackets = "".join(_BRACKET.findall(_JSON_STRING.sub("", text)))
    steps = np.where(np.isin(np.frombuffer(brackets.encode(), np.uint8), [ord("["), ord("{")]), 1, -1)
    depth = int(np.cumsum(steps).max()) if len(steps) else 0
    return f"JSON nested {depth} levels deep, more than {limit}" if depth > limit else None


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: 4x faster than (?:[^"\\]|\\.)*
_BRACKET = re.compile(r"[\[\]{}]")


def loads_bounded(text: str, limit: int = MAX_DEPTH) -> Any:
    """json.loads after the nesting check; ValueError (a JSONDecodeError or the depth) when it fails."""
    problem = nesting_problem(text, limit)
    if problem:
        raise ValueError(problem)
    try:
        return json.loads(text)
    except RecursionError:  # a backstop: the check above comes first
        raise ValueError(f"JSON nested more than {limit} levels deep") from None


def _load_json(path: Path, limits: Limits, escaped: set[int]) -> tuple[list[Any], Any]:
    text = read_text(path, limits)
    if not text.strip():
        return [], _index_position
    try:  # no depth scan first: it costs as much as parsing a whole file; the parser's own bound holds
        data = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deep to parse (records are flat; a conversation nests 3 deep)") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines saved as .json
            return _parse_jsonl(path, text, limits, escaped)
        raise DataError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e
    if isinstance(data, dict):
        escaped.update([0] if _SURROGATE_ESCAPE.search(text) else [])
        return [data], _index_position
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(text):
        escaped.update(range(len(data)))
    return data, _index_position


def _parse_jsonl(path: Path, text: str, limits: Limits, escaped: set[int]) -> tuple[list[Any], Any]:
    items: list[Any] = []
    lines: list[int] = []
    for lineno, line in enumerate(_split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            items.append(_line_value(line, limits))
        except ValueError as e:
            raise DataError(f"{path}: {_json_problem(e, lineno)}") from e
        if "\\u" in line and _SURROGATE_ESCAPE.search(line):
            escaped.add(len(lines))
        lines.append(lineno)
    return items, lambda index: f"line {lines[index]}"


def _line_value(line: str, limits: Limits) -> Any:
    """One JSON Lines value, within the line length and nesting limits (ValueError otherwise)."""
    if len(line) > limits.max_line:
        raise ValueError(f"a line of {_size(len(line))}, more than the limit of {_size(limits.max_line)} (--max-line-mb)")
    return loads_bounded(line, limits.max_depth)


def _json_problem(exc: ValueError, lineno: int) -> str:
    return f"invalid JSON on line {lineno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else f"line {lineno}: {exc}"


def _split_lines(text: str) -> list[str]:
    """Split on newlines only: str.splitlines would also split on U+2028 and friends, which
    json.dumps(ensure_ascii=False) leaves unescaped inside strings."""
    return text.split("\n")


def _load_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read Parquet: {e}") from e


class _RaggedRow(dict):
    """A CSV row with more or fewer cells than the header: rejected with `problem` as the reason."""

    problem = ""


def _load_csv(path: Path, delimiter: str, limits: Limits) -> list[dict]:
    """CSV cells stay strings (no type guessing that would turn ids into floats)."""
    csv.field_size_limit(limits.max_line)  # a cell longer than a line may be: "field larger than field limit"
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            return [_checked_row(row, reader) for row in reader]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except csv.Error as e:
        raise DataError(f"{path}: invalid CSV: {e}") from e


def _checked_row(row: dict, reader: csv.DictReader) -> dict:
    """The row, or a `_RaggedRow` when its cell count differs from the header's."""
    extra = row.pop(None, None)  # DictReader's restkey: cells past the header
    missing = sum(value is None for value in row.values())  # its restval: cells the row lacks
    if not extra and not missing:
        return row
    cells = len(reader.fieldnames) + len(extra or []) - missing
    ragged = _RaggedRow({k: v for k, v in row.items() if v is not None})
    ragged.problem = f"line {reader.line_num}: {cells} cells, the header has {len(reader.fieldnames)}"
    return ragged


def _check_ids(path: Path, raw: list[Any], where: Callable[[int], str]) -> None:
    """Ids are strings or numbers: an object, a list or true/false would become a Python repr that
    no other tool spells the same way, so the whole file is refused at the first one."""
    for index, item in enumerate(raw):
        value = item.get("id") if isinstance(item, dict) else None
        if value is None or isinstance(value, (str, int, float, decimal.Decimal)) and not isinstance(value, bool):
            continue
        kind = {dict: "an object", list: "a list", bool: "true/false"}.get(type(value), type(value).__name__)
        raise DataError(f"{path}: {where(index)}: field id: must be a string or a number, got {kind}")


def _given_id(item: Any) -> str | None:
    """The source's own id as a string; missing, null or blank means none was given."""
    if not isinstance(item, dict):
        return None
    value = item.get("id")
    if value is None:
        return None
    value = str(value)
    return value if value.strip() else None


def _normalise(item: Any) -> tuple[dict, tuple[str, str] | None]:
    """One raw item to the record shape, or the (field, reason) that rejects it."""
    if not isinstance(item, dict):
        return {}, ("record", f"not a JSON object ({type(item).__name__})")
    if isinstance(item, _RaggedRow):
        return {}, ("record", item.problem)
    if "instruction" not in item and "output" not in item:
        if isinstance(item.get("conversations"), list):
            return _from_turns(item, "conversations", "from", "value")
        if isinstance(item.get("messages"), list):
            return _from_turns(item, "messages", "role", "content")
    return _from_alpaca(item)


def _from_alpaca(item: dict) -> tuple[dict, tuple[str, str] | None]:
    """Alpaca fields first; a null input counts as none (Parquet/CSV fill absent cells)."""
    inp = item.get("input")
    if inp is not None and not isinstance(inp, str):
        return {}, ("input", f"not a string ({type(inp).__name__})")
    rec: dict = {"id": _given_id(item)}
    for key in ("instruction", "input", "output"):
        if key in item and not (key == "input" and inp is None):
            rec[key] = item[key]
    rec.update((k, v) for k, v in item.items() if k not in _ALPACA_KEYS)
    return rec, _first_problem(rec, _REQUIRED)


def _from_turns(
    item: dict, key: str, role_key: str, text_key: str
) -> tuple[dict, tuple[str, str] | None]:
    """A ShareGPT `conversations` or OpenAI-style `messages` list holding one exchange."""
    turns = item[key]
    if not all(isinstance(t, dict) for t in turns):
        return {}, (key, "every turn must be an object")
    system = [t for t in turns if t.get(role_key) == _SYSTEM_ROLE]
    dialogue = [t for t in turns if t.get(role_key) != _SYSTEM_ROLE]
    roles = [t.get(role_key) for t in dialogue]
    if sum(r in _HUMAN_ROLES for r in roles) > 1 or sum(r in _ASSISTANT_ROLES for r in roles) > 1:
        return {}, (key, f"multi-turn conversation ({len(dialogue)} turns); single-turn only")
    if len(roles) != 2 or roles[0] not in _HUMAN_ROLES or roles[1] not in _ASSISTANT_ROLES:
        return {}, (key, f"expected one user turn then one assistant turn, got roles {roles}")
    if len(system) > 1:
        return {}, (key, "more than one system turn")
    rec: dict = {"id": _given_id(item)}
    for field, turn in zip(_REQUIRED, dialogue):
        if text_key in turn:
            rec[field] = turn[text_key]
    rec.update((k, v) for k, v in item.items() if k not in {"id", key})
    if system:
        rec["system"] = system[0].get(text_key)
    return rec, _first_problem(rec, _REQUIRED)


def _surrogate_problem(rec: dict, where: str) -> tuple[str, str] | None:
    """(field, reason) for the first field holding a lone surrogate (JSON's "\\ud800" alone): not
    Unicode, so no tokenizer or UTF-8 file can take it; None when there is none."""
    for field, value in rec.items():
        found = lone_surrogate(value)
        if found is not None:
            return field, f"{where}: lone surrogate U+{ord(found):04X} (half of a UTF-16 pair, not a character)"
    return None


def lone_surrogate(value: Any) -> str | None:
    if isinstance(value, str):
        match = None if value.isascii() else _SURROGATE.search(value)
        return match.group() if match else None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        return next((found for item in value if (found := lone_surrogate(item)) is not None), None)
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _first_problem(rec: dict, fields: tuple[str, ...]) -> tuple[str, str] | None:
    """(field, reason) for the first of `fields` that is not usable text, else None."""
    for field in fields:
        reason = _text_problem(rec, field)
        if reason is not None:
            return field, reason
    return None


def _text_problem(rec: dict, field: str) -> str | None:
    """Why `rec[field]` is not usable text, or None if it is a non-blank string."""
    if field not in rec:
        return "missing"
    value = rec[field]
    if value is None:
        return "null"
    if not isinstance(value, str):
        return f"not a string ({type(value).__name__})"
    if not value.strip():
        return "empty" if not value else "whitespace only"
    if is_blank(value):
        return "blank: only whitespace and invisible characters (zero-width, format, control)"
    return None


def is_blank(text: str) -> bool:
    """True when `text` shows nothing: only whitespace, invisible characters (zero-width space and
    joiners, BOM, bidi marks, soft hyphen, control characters) or blank fillers. The one blank rule
    for input records and for the model's own answers (`threeds.selection.answer_flags`)."""
    return not any(_visible(c) for c in text)


# Letters that draw nothing (fillers), beside the categories below.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Cn", "Zs", "Zl", "Zp"})


def _visible(char: str) -> bool:
    """Whether the character shows anything: not whitespace, a format or control character
    (zero-width space and joiners, BOM, bidi marks, soft hyphen), or a blank filler."""
    return char not in _BLANK_LETTERS and unicodedata.category(char) not in _INVISIBLE_CATEGORIES


def content_hash(rec: dict) -> str:
    """Stable id from the content: `h-` + 16 hex digits of sha256 over instruction/input/output.

    A missing and an empty input hash alike, so a CSV (empty cell) and a JSONL (no key) of the
    same data get the same ids.
    """
    payload = json.dumps(
        [rec["instruction"], rec.get("input") or "", rec["output"]], ensure_ascii=False
    ).encode("utf-8")
    return "h-" + hashlib.sha256(payload).hexdigest()[:16]


def _rename_repeated(records: list[dict], taken: set[str]) -> None:
    """Rename records that reuse an id to `<id>#2`, `<id>#3`, ... in file order."""
    for rec in records:
        rec["id"] = _unused(rec["id"], "#", taken)


def _unused(base: str, sep: str, taken: set[str]) -> str:
    """`base`, or `base<sep>2`, `base<sep>3`, ...: the first not yet taken (then taken)."""
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}{sep}{n}"
    taken.add(candidate)
    return candidate


def _assign_hash_ids(records: list[dict], taken: set[str]) -> None:
    """Give id-less records content-hash ids; repeats get `-2`, `-3`, ... in file order."""
    for rec in records:
        rec["id"] = _unused(content_hash(rec), "-", taken)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    """Let numpy scalars and arrays (metrics, embeddings) serialise as plain JSON."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def strict_json(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes NaN or Infinity (not JSON): such numbers become null."""
    try:
        return json.dumps(obj, ensure_ascii=False, default=_json_default, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(_finite(obj), ensure_ascii=False, default=_json_default, allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    """A copy with NaN and infinite floats (numpy ones too) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _finite(obj.tolist())
    return obj


def _dumps_line(row: Any) -> str:
    return strict_json(row) + "\n"


def write_jsonl(path: PathLike, rows: Iterable[Any]) -> int:
    """Replace `path` atomically with one JSON value per line; returns the number of rows."""
    lines = [_dumps_line(row) for row in rows]
    atomic_write(path, lambda f: f.write("".join(lines)), "w")
    return len(lines)


def append_jsonl(path: PathLike, rows: Iterable[Any]) -> int:
    """Append rows durably (flush + fsync) for resumable outputs; returns the number appended.

    A partial last line left by a killed writer is cut off first, so the new rows start on a
    line of their own instead of corrupting the file.
    """
    path = Path(path)
    make_parent(path)
    text = "".join(_dumps_line(row) for row in rows)
    try:
        _drop_partial_tail(path)
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.filename is None:  # ENOSPC from write or fsync names no file: name the log
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise
    return text.count("\n")


def _drop_partial_tail(path: Path, block: int = 1 << 16) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            cut = f.read(pos - start).rfind(b"\n")
            if cut >= 0:
                pos = start + cut + 1
                break
            pos = start
        warnings.warn(f"{path}: dropping a truncated last line ({end - pos} bytes)", stacklevel=3)
        f.truncate(pos)


def read_jsonl(path: PathLike, limits: Limits | None = None) -> list[Any]:
    """Read JSON Lines written by `write_jsonl` / `append_jsonl`.

    A malformed last line without a trailing newline is what a killed writer leaves behind: it
    is ignored with a warning. Any other malformed line raises DataError.
    """
    path, limits = Path(path), limits or Limits()
    text = read_text(path, limits)
    lines = _split_lines(text)
    rows: list[Any] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(_line_value(line, limits))
        except ValueError as e:
            if isinstance(e, json.JSONDecodeError) and lineno == len(lines):  # no newline after it: an interrupted write
                warnings.warn(f"{path}: ignoring truncated last line {lineno}", stacklevel=2)
                break
            raise DataError(f"{path}: {_json_problem(e, lineno)}") from e
    return rows


def write_json(path: PathLike, obj: Any) -> None:
    """Write one JSON document atomically (manifests, selections)."""
    text = strict_json(obj, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text), "w")


def write_records(path: PathLike, records: Sequence[dict]) -> None:
    """A JSON array, or JSON Lines when the name ends in .jsonl, written atomically."""
    if Path(path).suffix.lower() in _JSONL_SUFFIXES:
        write_jsonl(path, records)
    else:
        write_json(path, list(records))


def fingerprint(path: PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of the file's bytes, streamed so large datasets need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def to_alpaca(rec: dict) -> dict:
    """Alpaca row: instruction, input ("" if none), output, then every other field."""
    out = {
        "instruction": rec["instruction"],
        "input": rec.get("input") or "",
        "output": rec["output"],
    }
    out.update((k, v) for k, v in rec.items() if k not in out)
    return out


def to_sharegpt(rec: dict) -> dict:
    """ShareGPT row: one human/gpt exchange (input folded into the human turn), system if any,
    then every other field."""
    out: dict = {
        "conversations": [
            {"from": "human", "value": full_instruction(rec)},
            {"from": "gpt", "value": rec["output"]},
        ]
    }
    if rec.get("system"):
        out["system"] = rec["system"]
    skip = {"instruction", "input", "output", "system", "conversations"}
    out.update((k, v) for k, v in rec.items() if k not in skip)
    return out
