"""Run files checked as they are read: readable, the shapes and dtypes of docs/DESIGN.md, and in
agreement with each other.

`metrics.parquet` is the reference: its ids must be unique, `data.jsonl` must hold the same ids
row for row, `embeddings.npy` one float row per metrics row, and `tokens.parquet` only ids of
scored samples. A file that breaks any of this raises `RunFileError` with one line naming the
file and what to do, before anything is computed from it: a repeated id would otherwise make
`select` hand back the wrong record without a word.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from threeds.io.data import DataError, loads_bounded, read_text
from threeds.names import METRIC_COLUMNS, TOKEN_COLUMNS
from threeds.rundir import layout
from threeds.rundir.record_index import RecordFile, open_records
from threeds.rundir.run_file_error import RESCORE, RunFileError

MANIFEST_SECTIONS = ("config", "score_config", "model", "data", "timings", "report", "stages", "packages")
__all__ = ["RESCORE", "RunFileError"]  # re-exported: the names callers have always taken from here


def _fail(path: Path, problem: str, fix: str = RESCORE) -> RunFileError:
    return RunFileError(f"{problem}; {fix}", path=path)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold one object (manifest.json, selection.json, progress.json)."""
    try:
        value = loads_bounded(read_text(path))
    except DataError as exc:  # not a regular file, too big, not UTF-8: checked before it is read
        raise _fail(path, str(exc).removeprefix(f"{path}: "), "delete the file and run the stage again") from exc
    except ValueError as exc:  # corrupt, or nested deeper than any file threeds writes
        raise _fail(path, f"corrupt JSON ({exc})", "delete the file and run the stage again") from exc
    if not isinstance(value, dict):
        raise _fail(path, f"expected a JSON object, got {type(value).__name__}", "delete the file and run the stage again")
    return value


def read_manifest(path: Path) -> dict:
    """manifest.json: an object whose sections, where present, are objects."""
    manifest = read_json_object(path)
    for key in MANIFEST_SECTIONS:
        if key in manifest and not isinstance(manifest[key], dict):
            raise _fail(path, f"field {key}: expected an object, got {type(manifest[key]).__name__}",
                        "delete the run directory or use a new --out")  # fmt: skip
    return manifest


def stage_part(manifest: dict, stage: str, part: str) -> dict:
    """`manifest["stages"][stage][part]` (part: config, summary, data, ...), {} where a level is missing
    or not an object: how every reader of the `stages` section but its writer (`threeds.stages.pipeline.Stages`)
    reads it, so a run made before a stage recorded something reads as "not recorded"."""
    value = manifest.get("stages")
    for key in (stage, part):
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, dict) else {}


def _not_ids(ids: pd.Series) -> np.ndarray:
    """Per row, whether it is not a non-empty string: vectorised for a string column (1.9M ids in
    tens of milliseconds, not seconds), value by value for a column of mixed objects."""
    if isinstance(ids.dtype, pd.StringDtype):
        return (ids.isna() | (ids.str.len() == 0)).to_numpy(dtype=bool)
    return np.fromiter((not (isinstance(i, str) and i) for i in ids), dtype=bool, count=len(ids))


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.parquet: the metric columns as numbers, non-empty unique string ids."""
    frame = _read_parquet(path)
    missing = [c for c in METRIC_COLUMNS if c not in frame.columns]
    if missing:
        raise _fail(path, f"missing columns {missing}", "score again with this version of threeds")
    ids = frame["id"]
    bad = np.flatnonzero(_not_ids(ids))
    if len(bad):
        raise _fail(path, f"row {bad[0]}: field id: expected a non-empty string, got {ids.iloc[bad[0]]!r}")
    _require_unique(path, ids)
    for column in METRIC_COLUMNS[1:]:
        if not pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column]):
            raise _fail(path, f"column {column}: expected numbers, got {frame[column].dtype}")
    return frame


def read_scored_records(run_dir: Path, ids: list[str]) -> RecordFile:
    """data.jsonl: one record per metrics row, same ids in the same order, read by row
    (`threeds.rundir.record_index`: never parsed whole)."""
    path = Path(run_dir) / layout.DATA
    try:
        return open_records(path, ids, run_dir)
    except (DataError, OSError) as exc:
        raise RunFileError(f"{exc}; {RESCORE}") from exc


def selected_records(run_dir: str | os.PathLike, selected_ids: Sequence[str]) -> list[dict]:
    """Records of data.jsonl with the given ids, in the given (pick) order, all fields kept;
    only those records are read."""
    run_dir = Path(run_dir)
    ids = read_metrics(run_dir / layout.METRICS)["id"]
    rows = pd.Index(ids).get_indexer([str(i) for i in selected_ids])
    if (rows < 0).any():
        missing = [i for i, r in zip(selected_ids, rows) if r < 0]
        raise _fail(run_dir / layout.DATA, f"{len(missing)} selected ids not in it, e.g. {missing[:5]}", "select again")
    return read_scored_records(run_dir, ids.tolist()).take(rows)


def read_embeddings(path: Path, n: int) -> np.ndarray:
    """embeddings.npy: a 2-D float array (float32, or float16 as a run at scale keeps it) with one
    row per metrics row, memory-mapped in the dtype on disk: never read whole, never converted."""
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _fail(path, f"not a readable .npy array ({exc})") from exc
    if not isinstance(emb, np.ndarray) or emb.ndim != 2 or emb.shape[0] != n:
        raise _fail(path, f"shape {getattr(emb, 'shape', None)} does not match {n} rows of metrics.parquet")
    if emb.dtype.kind != "f":
        raise _fail(path, f"dtype {emb.dtype}: expected float32 or float16")
    return emb


def check_token_ids(path: Path, ids: list[str]) -> None:
    """tokens.parquet: the columns of DESIGN.md, and only ids that metrics.parquet holds."""
    try:
        schema = pq.read_schema(path)
        table = pq.read_table(path, columns=["id"], read_dictionary=["id"]) if "id" in schema.names else None
    except (pa.ArrowException, OSError) as exc:
        raise _fail(path, f"cannot read Parquet ({_short(exc)})") from exc
    missing = [c for c in TOKEN_COLUMNS if c not in schema.names]
    if missing:
        raise _fail(path, f"missing columns {missing}")
    found: set = set()
    for chunk in table.column("id").chunks:
        found.update(chunk.dictionary.to_pylist() if pa.types.is_dictionary(chunk.type) else chunk.to_pylist())
    stray = found - set(ids)
    if stray:
        raise _fail(path, f"{len(stray)} ids that metrics.parquet lacks, e.g. {sorted(map(str, stray))[:3]}")


def load_scored(run_dir: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """metrics and embeddings of a scored run, after checking them against data.jsonl and tokens."""
    if not run_dir.is_dir():
        raise RunFileError(f"{run_dir}: no such run directory")
    for name in layout.SCORED:
        if not (run_dir / name).is_file():
            raise _fail(run_dir / name, "missing (the run has not been scored)", "run `threeds score` into it first")
    metrics = read_metrics(run_dir / layout.METRICS)
    ids = metrics["id"].tolist()
    embeddings = read_embeddings(run_dir / layout.EMBEDDINGS, len(metrics))
    read_scored_records(run_dir, ids)
    if (run_dir / layout.TOKENS).exists():
        check_token_ids(run_dir / layout.TOKENS, ids)
    return metrics, embeddings


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise _fail(path, f"cannot read Parquet ({_short(exc)})") from exc


def has_repeats(values: pd.Series) -> bool:
    """Whether a value appears twice: Arrow's hash table counts the distinct values (1.9M ids in
    ~0.3 s, half of pandas's `duplicated`, which also builds a mask a unique column never needs)."""
    return len(pc.unique(pa.array(values))) < len(values)


def _require_unique(path: Path, ids: pd.Series) -> None:
    """metrics.parquet's ids appear once each (checked by a hash table, not a Python dict)."""
    if has_repeats(ids):
        repeated = ids.duplicated().to_numpy()
        row = int(np.flatnonzero(repeated)[0])
        first = int(np.flatnonzero((ids == ids.iloc[row]).to_numpy())[0])
        raise _fail(path, f"row {row}: duplicate id {ids.iloc[row]!r} (first at row {first})")


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
