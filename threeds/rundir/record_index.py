"""data.jsonl read by row through an index of byte offsets: a page reads only the records it shows.

At the paper's scale (1.9M records, several GB of text) parsing data.jsonl whole costs minutes and
more memory than the app or `threeds select` may take. One streaming pass instead checks every
line (a JSON object whose id is the id of the same row of metrics.parquet, `check.read_metrics`)
and notes where each line starts. The offsets are kept beside the run (`layout.DATA_INDEX`),
described by data.jsonl's size and mtime and a digest of the ids, so a later open reads 8 bytes
per row and no text. Memory: one line at a time while indexing, the offsets (8 bytes per row)
after, and the records a caller asks for.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from threeds.io.array_cache import read_cached, write_cached
from threeds.io.data import Limits, checked_size, loads_bounded
from threeds.rundir import layout
from threeds.rundir.run_file_error import RESCORE, RunFileError

_UNLIMITED = Limits(max_bytes=1 << 62)  # the file is streamed: only its lines' length and depth are bounded
_READ_BYTES = 16 << 20  # bytes read at a time when iterating


class RecordFile(Sequence[dict]):
    """data.jsonl as a read-only sequence of records, one per metrics row; each access reads its lines."""

    def __init__(self, path: Path, offsets: np.ndarray, stamp: dict) -> None:
        self.path, self.offsets = Path(path), offsets  # offsets[r]: where row r starts; offsets[-1]: where the last ends
        self.stamp = stamp  # the file's size and mtime when indexed: names this content for caches derived from it

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row):
        if isinstance(row, slice):
            return self.take(np.arange(len(self))[row])
        row = int(row)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of {len(self)} records")
        with open(self.path, "rb") as fh:
            return self._read(fh, row)

    def take(self, rows: Sequence[int] | np.ndarray) -> list[dict]:
        """The records of `rows`, in that order (read in file order: one pass of seeks)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        out: list = [None] * len(rows)
        with open(self.path, "rb") as fh:
            for at in np.argsort(rows, kind="stable"):
                out[at] = self._read(fh, int(rows[at]))
        return out

    def __iter__(self) -> Iterator[dict]:
        for chunk in self.chunks():
            yield from chunk

    def chunks(self, size: int = 50_000) -> Iterator[list[dict]]:
        """The records in row order, `size` at a time (one read per chunk)."""
        with open(self.path, "rb") as fh:
            for start in range(0, len(self), size):
                stop = min(start + size, len(self))
                fh.seek(int(self.offsets[start]))
                data = fh.read(int(self.offsets[stop] - self.offsets[start]))
                base = int(self.offsets[start])
                yield [self._parse(data[int(self.offsets[r]) - base : int(self.offsets[r + 1]) - base], r) for r in range(start, stop)]

    def field(self, name: str, size: int = 50_000) -> Iterator[list]:
        """One field of every record (None where absent), `size` records at a time."""
        for chunk in self.chunks(size):
            yield [r.get(name) for r in chunk]

    def codes(self, name: str) -> tuple[np.ndarray, list[str]]:
        """One field of few values (a record's source) as a code per row into the list of its values
        ("" where absent, null or empty). Arrow's JSON reader parses the file in C++, outside the GIL
        and on one thread, so a server computing this beside its pages stays responsive; a file it cannot read
        as one string column of these rows (a value of another type) is read line by line instead."""
        try:
            values = _string_column(self.path, name)
        except (pa.ArrowException, OSError):
            values = None
        if values is None or len(values) != len(self):
            return codes_of((v for chunk in self.field(name) for v in chunk), len(self))
        encoded = pc.fill_null(values, "").dictionary_encode()
        return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32), encoded.dictionary.to_pylist()

    def matching(self, needle: str, text_of: Callable[[dict], str], limit: int | None = None, size: int = 50_000) -> np.ndarray:
        """Rows whose `text_of(record)` contains `needle`, case-insensitively (str.lower), ascending;
        the first `limit` only. Reads `size` records' bytes at a time and parses only the lines
        whose raw bytes contain the needle, where that is a sure test (`_raw_needle`)."""
        needle = needle.lower()
        raw = _raw_needle(needle)
        found: list[np.ndarray] = []
        count = 0
        with open(self.path, "rb") as fh:
            for start in range(0, len(self), size):
                stop = min(start + size, len(self))
                base = int(self.offsets[start])
                fh.seek(base)
                data = fh.read(int(self.offsets[stop]) - base)
                rows = np.arange(start, stop)
                if raw is not None:
                    hits = np.fromiter((m.start() for m in re.finditer(re.escape(raw), data.lower())), dtype=np.int64)
                    rows = np.unique(np.searchsorted(self.offsets, hits + base, side="right") - 1)
                bounds = self.offsets[rows] - base, self.offsets[rows + 1] - base
                keep = [r for r, a, b in zip(rows, *bounds) if needle in text_of(self._parse(data[a:b], int(r))).lower()]
                found.append(np.asarray(keep, dtype=np.int64))
                count += len(keep)
                if limit is not None and count >= limit:
                    break
        rows = np.concatenate(found) if found else np.empty(0, dtype=np.int64)
        return rows if limit is None else rows[:limit]

    def _read(self, fh, row: int) -> dict:
        fh.seek(int(self.offsets[row]))
        return self._parse(fh.read(int(self.offsets[row + 1] - self.offsets[row])), row)

    def _parse(self, data: bytes, row: int) -> dict:
        try:
            value = json.loads(data)
        except ValueError as exc:  # the file changed after it was indexed
            raise RunFileError(f"row {row}: not the JSON object indexed ({exc}); {RESCORE}", path=self.path) from None
        if not isinstance(value, dict):
            raise RunFileError(f"row {row}: expected a JSON object; {RESCORE}", path=self.path)
        return value


def codes_of(values: Iterable, count: int = -1) -> tuple[np.ndarray, list[str]]:
    """Values of few kinds as a code per value into the list of the kinds (as text; "" for None or
    empty), in the order first seen."""
    names: dict[str, int] = {"": 0}
    codes = np.fromiter((names.setdefault(str(v or ""), len(names)) for v in values), dtype=np.int32, count=count)
    return codes, list(names)


def _string_column(path: Path, name: str) -> pa.Array:
    """Field `name` of every line of a JSONL file as one string array (null where absent), the
    other fields skipped; ArrowInvalid when a value is not a string or a line is not JSON."""
    options = pa_json.ParseOptions(explicit_schema=pa.schema([(name, pa.string())]), unexpected_field_behavior="ignore")
    read = pa_json.ReadOptions(block_size=_READ_BYTES, use_threads=False)  # one core: a server's pages keep the others
    with pa_json.open_json(path, read_options=read, parse_options=options) as reader:
        return pa.chunked_array([batch.column(0) for batch in reader], pa.string()).combine_chunks()


def _raw_needle(needle: str) -> bytes | None:
    """The bytes a lower-cased needle shows in data.jsonl's lower-cased raw lines when it is printable
    ASCII without a quote or backslash (json.dumps writes those characters as they are, and
    lower-casing bytes agrees with str.lower on ASCII); None otherwise (every line is parsed)."""
    if needle and all(" " <= c <= "~" and c not in '"\\' for c in needle):
        return needle.encode("ascii")
    return None


def open_records(path: str | os.PathLike, ids: Sequence[str], run_dir: str | os.PathLike | None = None) -> RecordFile:
    """data.jsonl of a run as a `RecordFile`, its lines checked against `ids` (metrics.parquet's, in
    row order); the offsets are reused from `run_dir`'s index while data.jsonl and the ids are
    unchanged, else made in one pass and kept there (an unwritable directory costs the pass next time)."""
    path = Path(path)
    size = checked_size(path, _UNLIMITED)  # a FIFO or a device: refused before it is read
    info = path.stat()
    digest = hashlib.sha256("\n".join(ids).encode("utf-8", "surrogatepass")).hexdigest()
    meta = {"size": size, "mtime_ns": info.st_mtime_ns, "rows": len(ids), "ids_sha256": digest}
    folder = Path(run_dir) if run_dir is not None else path.parent
    array_path, meta_path = (folder / name for name in layout.DATA_INDEX)
    offsets = read_cached(array_path, meta_path, meta, (len(ids) + 1,))
    if offsets is None or offsets.dtype != np.int64 or (np.diff(offsets) <= 0).any() or offsets[-1] > size:
        offsets = index_lines(path, ids)
        write_cached(array_path, meta_path, offsets, meta)
    return RecordFile(path, offsets, {"size": size, "mtime_ns": info.st_mtime_ns})


def index_lines(path: Path, ids: Sequence[str], limits: Limits = _UNLIMITED) -> np.ndarray:
    """Where each record of data.jsonl starts (and, last, where the last one ends), after checking
    that line by line it is a JSON object with the id of the same metrics row; RunFileError naming
    the line otherwise. Blank lines are skipped; a torn last line (no newline) is ignored, as
    `threeds.io.data.read_jsonl` does."""
    offsets = np.empty(len(ids) + 1, dtype=np.int64)
    row = pos = 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                value = _line(path, line, lineno, limits)
                if value is None:  # torn last line
                    break
                sample_id = value.get("id") if isinstance(value, dict) else None
                if row >= len(ids) or sample_id != ids[row]:
                    raise _misplaced(path, ids, row, lineno, sample_id)
                offsets[row] = pos
                row += 1
            pos += len(line)
    if row != len(ids):
        raise RunFileError(f"its ids do not match metrics.parquet row for row ({row} records for {len(ids)} rows; "
                           f"first difference at row {row}); {RESCORE}", path=path)  # fmt: skip
    offsets[row] = pos
    return offsets


def _line(path: Path, line: bytes, lineno: int, limits: Limits) -> object:
    """The line's JSON value; None for a torn last line; RunFileError for another bad line."""
    if len(line) > limits.max_line:
        raise RunFileError(f"line {lineno}: longer than the limit of {limits.max_line} bytes; {RESCORE}", path=path)
    try:
        return loads_bounded(line.decode("utf-8"), limits.max_depth)
    except UnicodeDecodeError as exc:
        raise RunFileError(f"line {lineno}: not UTF-8 text (byte {exc.start}); {RESCORE}", path=path) from None
    except ValueError as exc:
        if not line.endswith(b"\n"):
            return None
        what = f"invalid JSON on line {lineno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else f"line {lineno}: {exc}"
        raise RunFileError(f"{what}; {RESCORE}", path=path) from None


def _misplaced(path: Path, ids: Sequence[str], row: int, lineno: int, sample_id: object) -> RunFileError:
    """The error for a line whose id is not the one metrics.parquet has at its row: a repeated id
    (the rows before matched, so it repeats one of them) or the ids out of order."""
    earlier = pd.Index(ids[:row]).get_indexer([sample_id]) if isinstance(sample_id, str) and row else np.array([-1])
    if earlier[0] >= 0:
        return RunFileError(f"line {lineno}: duplicate id {sample_id!r} (first at line {_line_of(path, int(earlier[0]))}); {RESCORE}", path=path)
    return RunFileError(f"its ids do not match metrics.parquet row for row (line {lineno} has id {sample_id!r} where row "
                        f"{row} has {ids[row] if row < len(ids) else None!r}; first difference at row {row}); {RESCORE}", path=path)  # fmt: skip


def _line_of(path: Path, row: int) -> int:
    """The line number of the `row`-th non-blank line (only for an error message)."""
    seen = -1
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            seen += bool(line.strip())
            if seen == row:
                return lineno
    return row + 1

