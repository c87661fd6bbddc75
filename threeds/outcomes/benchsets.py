"""Multiple-choice evaluation sets: the two bundled ones and readers for a user's own exam file.

`load_bench(spec)` takes `mmlu-medical` (MMLU's six medical subjects, 1,089 test items, 5 dev items
per subject for K-shot prompts), `pubmedqa` (PubMedQA's 500 test items with their abstracts; the
other 500 labelled items are its dev set), or a file:

* `.csv`: MMLU rows `question, option A, option B, ..., answer letter` (no header); the subject is
  the file name without `_test`/`_dev`/`_val`.
* `.json` object of `{pmid: {QUESTION, CONTEXTS, final_decision}}`: PubMedQA (choices yes/no/maybe).
* `.json` array or `.jsonl` rows: `question`, `options` (a list, or a dict keyed by letter) or
  CMB's `option` dict `{A..E}`, `answer` (a letter, an option's index or its text), optional `id`
  (default: the row number) and `subject` (CMB's `exam_subject`). Empty options (CMB pads with
  them) are dropped.

A file that cannot be scored as a whole (bad syntax, an answer not among the options, a duplicate
id, fewer than two options, no item at all) raises one `DataError` naming the file and the item;
nothing is kept. Files are read within `LIMITS` (the data reader's bounds: a regular file, its size,
a line's length, JSON nesting), and an item's text within `MAX_ITEM_CHARS`, so a hostile file
costs seconds and bounded memory.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from threeds.io.data import DataError, Limits, lone_surrogate, loads_bounded, read_text

BUNDLED = ("mmlu-medical", "pubmedqa")
PUBMEDQA_CHOICES = ["yes", "no", "maybe"]
PUBMEDQA_LABELLED, PUBMEDQA_TEST = "ori_pqal.json", "test_ground_truth.json"  # the release's labelled set and its test split
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SPLITS = ("_test", "_dev", "_val")
LIMITS = Limits(max_bytes=256 * 2**20, max_line=2**20)  # MMLU's largest file is 0.3 MB, CMB's 30 MB
MAX_ITEM_CHARS = 200_000  # question, context and options together: past any context a model here holds


@dataclass(frozen=True)
class BenchItem:
    """One question: `gold` is the index of the right answer in `choices`; `context` is text shown
    before the question (PubMedQA's abstract), empty for most sets."""

    id: str
    question: str
    choices: list[str]
    gold: int
    subject: str
    context: str = ""


@dataclass(frozen=True)
class Bench:
    """A named evaluation set: the items scored, and `dev` items for K-shot prompts (maybe none)."""

    name: str
    items: list[BenchItem]
    dev: list[BenchItem] = field(default_factory=list)


def eval_data_dir() -> Path:
    """The bundled sets' folder inside the installed package."""
    return Path(str(resources.files("threeds") / "eval_data"))


def load_bench(spec: str | os.PathLike, limit: int | None = None) -> Bench:
    """The evaluation set `spec` (a bundled name or a file), with at most `limit` items spread
    evenly over it (`spread`), so that a small run still sees every subject."""
    if str(spec) == "mmlu-medical":
        bench = _mmlu_medical()
    elif str(spec) == "pubmedqa":
        bench = _pubmedqa_bundled()
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(f"--bench {spec}: neither one of {', '.join(BUNDLED)} nor an existing file")
        bench = Bench(path.stem, read_bench_file(path))
        if not bench.items:
            raise DataError(f"{path}: no items (the file is empty); expected questions with options and an answer")
    _check_unique(spec, bench.items)
    return Bench(bench.name, spread(bench.items, limit), bench.dev)


def spread(items: list, limit: int | None) -> list:
    """`limit` items at evenly spaced positions (every n/limit-th, from the first), in their order."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    return [items[i * len(items) // limit] for i in range(limit)]


def read_bench_file(path: Path) -> list[BenchItem]:
    """Every item of one file, by its format (module docstring)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_mmlu_csv(path)
    if suffix in (".jsonl", ".ndjson"):
        return _rows_to_items(path, _jsonl_rows(path))
    if suffix == ".json":
        data = _json(path)
        if isinstance(data, dict) and data and all(isinstance(v, dict) and "QUESTION" in v for v in data.values()):
            return read_pubmedqa(path, data)
        if isinstance(data, list):
            return _rows_to_items(path, [(f"item {i + 1}", row) for i, row in enumerate(data)])
        raise DataError(f"{path}: expected a JSON array of questions or a PubMedQA object of {{pmid: {{QUESTION, ...}}}}")
    raise DataError(f"{path}: unknown evaluation file type {suffix or '(none)'}; expected .csv, .json or .jsonl")


# --------------------------------------------------------------------------- bundled sets


def _mmlu_medical() -> Bench:
    root = eval_data_dir() / "mmlu_medical"
    test = [item for f in sorted((root / "test").glob("*_test.csv")) for item in read_mmlu_csv(f)]
    dev = [item for f in sorted((root / "dev").glob("*_dev.csv")) for item in read_mmlu_csv(f)]
    return Bench("mmlu-medical", test, dev)


def _pubmedqa_bundled() -> Bench:
    root = eval_data_dir() / "pubmedqa"
    labelled = read_pubmedqa(root / PUBMEDQA_LABELLED, _json(root / PUBMEDQA_LABELLED))
    test_ids = _json(root / PUBMEDQA_TEST)
    test = [item for item in labelled if item.id in test_ids]
    for item in test:
        if PUBMEDQA_CHOICES[item.gold] != test_ids[item.id]:
            raise DataError(f"{root}: item {item.id}: ground truth {test_ids[item.id]!r} differs from the labelled set")
    return Bench("pubmedqa", test, [item for item in labelled if item.id not in test_ids])


# --------------------------------------------------------------------------- formats


def read_mmlu_csv(path: Path) -> list[BenchItem]:
    """MMLU rows: question, two or more options, the answer letter; ids `<subject>-<row>`."""
    subject = path.stem
    for split in _SPLITS:
        subject = subject.removesuffix(split)
    items = []
    rows = csv.reader(io.StringIO(_text(path), newline=""))
    for number in itertools.count(1):
        where = f"row {number}"
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:  # a cell past LIMITS.max_line (csv's field size limit), a stray NUL
            raise DataError(f"{path}: {where}: invalid CSV: {exc}") from None
        if len(row) < 4:
            raise DataError(f"{path}: {where}: expected question, at least two options and an answer letter, "
                            f"got {len(row)} fields")  # fmt: skip
        question, options, answer = row[0], row[1:-1], row[-1].strip()
        items.append(_item(path, where, f"{subject}-{number}", question, options, answer, subject))
    return items


def read_pubmedqa(path: Path, data: dict) -> list[BenchItem]:
    """PubMedQA `{pmid: {QUESTION, CONTEXTS, final_decision}}`; the abstract is the item's context."""
    items = []
    for pmid, entry in data.items():
        where = f"item {pmid}"
        contexts = entry.get("CONTEXTS", [])
        if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
            raise DataError(f"{path}: {where}: CONTEXTS must be a list of texts")
        context = "\n".join(contexts)
        subject = "pubmedqa"
        items.append(_item(path, where, str(pmid), entry.get("QUESTION"), PUBMEDQA_CHOICES, entry.get("final_decision"),
                           subject, context))  # fmt: skip
    return items


def _rows_to_items(path: Path, rows: list[tuple[str, Any]]) -> list[BenchItem]:
    items = []
    for number, (where, row) in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where}: expected an object with question, options and answer")
        options = row.get("options", row.get("option"))
        given = row.get("id")
        item_id = str(given) if given is not None else str(number)
        where = f"{where} (id {item_id})" if given is not None else where
        subject = row.get("subject", row.get("exam_subject", "")) or ""
        items.append(_item(path, where, item_id, row.get("question"), options, row.get("answer"), str(subject)))
    return items


def _item(path: Path, where: str, item_id: str, question: Any, options: Any, answer: Any, subject: str,
          context: str = "") -> BenchItem:  # fmt: skip
    """A checked item; `options` a list or a dict keyed by letter, `answer` a letter, index or option text."""
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{path}: {where}: no question text")
    texts = [question, context, *(options.values() if isinstance(options, dict) else options if isinstance(options, list) else [])]
    if sum(len(t) for t in texts if isinstance(t, str)) > MAX_ITEM_CHARS:
        raise DataError(f"{path}: {where}: more than {MAX_ITEM_CHARS:,} characters of question, context and options")
    bad = lone_surrogate([item_id, subject, *texts])
    if bad is not None:
        raise DataError(f"{path}: {where}: lone surrogate U+{ord(bad):04X} (half of a UTF-16 pair, not a character)")
    if isinstance(options, dict) and all(isinstance(v, str) for v in options.values()):
        kept = [(str(k), v) for k, v in options.items() if v.strip()]  # CMB pads with empty options
        keys, choices = [k for k, _ in kept], [v for _, v in kept]
    elif isinstance(options, list) and all(isinstance(o, str) for o in options):
        keys, choices = list(LETTERS[: len(options)]), list(options)
    else:
        raise DataError(f"{path}: {where}: options must be a list of texts or an object of letter: text")
    if len(choices) < 2 or any(not c.strip() for c in choices):
        raise DataError(f"{path}: {where}: needs at least two non-empty options, got {len(choices)}")
    gold = _gold_index(answer, keys, choices)
    if gold is None:
        raise DataError(f"{path}: {where}: answer {answer!r} is not among the options {', '.join(keys)}")
    return BenchItem(item_id, question.strip(), [c.strip() for c in choices], gold, subject, context.strip())


def _gold_index(answer: Any, keys: list[str], choices: list[str]) -> int | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    if not isinstance(answer, str):
        return None
    text = answer.strip()
    for candidates in (keys, [k.upper() for k in keys], [c.strip() for c in choices]):
        if text in candidates:
            return candidates.index(text)
    return None


def _check_unique(spec: Any, items: list[BenchItem]) -> None:
    seen: dict[str, int] = {}
    for number, item in enumerate(items, start=1):
        if item.id in seen:
            raise DataError(f"{spec}: duplicate id {item.id!r} (items {seen[item.id]} and {number})")
        seen[item.id] = number


# --------------------------------------------------------------------------- files


def _text(path: Path) -> str:
    """The file's text within LIMITS (a FIFO or a device refused before it is read)."""
    csv.field_size_limit(LIMITS.max_line)
    return read_text(path, LIMITS)


def _json(path: Path) -> Any:
    text = _text(path)
    try:
        return loads_bounded(text, LIMITS.max_depth)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    except ValueError as exc:  # nested past the limit
        raise DataError(f"{path}: {exc}") from None


def _jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    rows = []
    for number, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        if len(line) > LIMITS.max_line:
            raise DataError(f"{path}: line {number}: longer than {LIMITS.max_line // 2**20} MB")
        try:
            rows.append((f"line {number}", loads_bounded(line, LIMITS.max_depth)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: invalid JSON: {exc.msg}") from None
        except ValueError as exc:
            raise DataError(f"{path}: line {number}: {exc}") from None
    return rows
