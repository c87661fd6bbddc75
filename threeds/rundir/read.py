"""Run directories as the app sees them: list them, load them with validation (background runs: `threeds.rundir.jobs`).

A run may be partial (Stage 1 only, still scoring) or hold a damaged file. Loading never stops
at the first bad file: each file's problem is kept in `Run.errors` with a message that names the
file and what to do, so one page can report a corrupt file while the others keep working.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from threeds.config import SelectConfig
from threeds.errors import SettingsError, describe
from threeds.io.data import (
    DataError,
    Limits,
    checked_size,
    loads_bounded,
    read_jsonl,
    read_records,
    read_text,
)
from threeds.names import TOKEN_COLUMNS
from threeds.rundir import layout
from threeds.rundir.check import (
    RunFileError,
    check_token_ids,
    has_repeats,
    read_embeddings,
    read_json_object,
    read_manifest,
    read_metrics,
    read_scored_records,
    stage_part,
)
from threeds.rundir.record_index import RecordFile

DEFAULT_CACHE = Path("cache")
NOT_RUNS = {"models", "uploads"}
INPUT_READ_BYTES = 256 << 20  # an input file is read whole for its Stage-1-only records only below this
RUN_FILES = (
    layout.MANIFEST, layout.RATINGS, layout.REJECTS, layout.METRICS, layout.SELECTION, layout.DATA, layout.EMBEDDINGS,
    layout.TOKENS,
)  # fmt: skip


@dataclass
class Run:
    """The loaded files of one run directory; `None` where a stage has not written its file."""

    path: Path
    key: tuple = ()  # `run_key` taken before loading: what the loaded files correspond to
    manifest: dict = field(default_factory=dict)
    ratings: pd.DataFrame | None = None  # Stage 1: id, score (NaN when unrated), ...
    metrics: pd.DataFrame | None = None  # Stage 2, one row per scored sample
    records: RecordFile | None = None  # data.jsonl, aligned with metrics rows, read by row (never whole)
    embeddings: np.ndarray | None = None  # [n, hidden] float32 or float16 as on disk, memory-mapped, aligned with metrics rows
    selection: dict | None = None
    rejects: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # file name -> what is wrong

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def row_of(self) -> RowOf:
        """Sample id -> row of metrics / records / embeddings."""
        return RowOf(pd.Index([] if self.metrics is None else self.metrics["id"]))

    @cached_property
    def input_records(self) -> dict[str, dict]:
        """Records by id: the scored ones plus, for Stage-1-only ids, those of the input file.

        Stage 1 rates every input record but `data.jsonl` holds only the scored ones; the
        dropped ones' text is read back from the input file named in the manifest, if it is there
        (duplicate ids renamed, as a run that accepted them did).
        """
        return self.unscored_records | {r["id"]: r for r in self.records or []}

    @cached_property
    def unscored_records(self) -> dict[str, dict]:
        """The input file's records by id (it holds the Stage-1-only ones), read whole, so only from a
        file under INPUT_READ_BYTES: a pool of millions is not held for a few dropped records'
        texts ({} then, and the pages say the text is not available)."""
        source = self.input_path
        if self.ratings is None or source is None:
            return {}
        try:
            if source.stat().st_size > INPUT_READ_BYTES:
                return {}
            return {r["id"]: r for r in read_records(source, duplicate_ids="rename")[0]}
        except (DataError, OSError) as exc:
            self.errors.setdefault("input data", f"{source}: {exc}")
            return {}

    @property
    def input_path(self) -> Path | None:
        """The input file named in the manifest; a relative name that does not resolve from here
        (a run made elsewhere, such as the shipped demo) is looked for in the run directory."""
        source = (self.manifest.get("data") or {}).get("path")
        if not source:
            return None
        for candidate in (Path(source), self.path / Path(source).name):
            if candidate.is_file():
                return candidate
        return None

    def record(self, sample_id: str) -> dict | None:
        """One record by id: a scored one read from data.jsonl by row, else the input file's."""
        row = self.row_of.get(sample_id)
        if row is not None and self.records is not None:
            return self.records[row]
        return self.unscored_records.get(sample_id)

    def tokens(self, sample_id: str) -> pd.DataFrame:
        """The rows of tokens.parquet for one sample (A then A', by position)."""
        return read_tokens(self.path / layout.TOKENS, sample_id)


class RowOf(Mapping[str, int]):
    """Sample id -> row, over the ids' own hash table (pandas), not a dict of millions of Python ints."""

    def __init__(self, ids: pd.Index) -> None:
        self.ids = ids

    def __getitem__(self, sample_id: str) -> int:
        if not isinstance(sample_id, str) or sample_id not in self.ids:
            raise KeyError(sample_id)
        return int(self.ids.get_loc(sample_id))

    def __contains__(self, sample_id: object) -> bool:
        return isinstance(sample_id, str) and sample_id in self.ids

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def list_runs(cache_dir: str | os.PathLike = DEFAULT_CACHE) -> list[Path]:
    """Run directories under `cache_dir`, most recently changed first."""
    root = Path(cache_dir)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and p.name not in NOT_RUNS and not p.name.startswith(".")]
    return sorted(runs, key=lambda p: (-_latest_mtime(p), p.name))


def _latest_mtime(path: Path) -> float:
    return max((f.stat().st_mtime for f in path.iterdir() if f.is_file()), default=path.stat().st_mtime)


def run_key(path: str | os.PathLike) -> tuple:
    """Changes whenever a file `load_run` reads changes: the cache key for everything loaded from
    the run (files the app itself adds, such as umap.npy, do not count)."""
    path = Path(path)
    stamps = []
    for name in RUN_FILES:
        try:
            stat = (path / name).stat()
        except OSError:
            continue
        stamps.append((name, stat.st_mtime_ns, stat.st_size))
    return (str(path.resolve()), *stamps)


def load_run(path: str | os.PathLike) -> Run:
    """Load every file a stage has written; problems go to `Run.errors`, never raised."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    run = Run(path, key=run_key(path))
    loaders = [
        (layout.MANIFEST, lambda p: setattr(run, "manifest", read_manifest(p))),
        (layout.RATINGS, lambda p: setattr(run, "ratings", read_ratings(p))),
        (layout.REJECTS, lambda p: setattr(run, "rejects", len(read_jsonl(p)))),
        (layout.METRICS, lambda p: setattr(run, "metrics", read_metrics(p))),
        (layout.SELECTION, lambda p: setattr(run, "selection", read_json_object(p))),
    ]
    for name, load in loaders:
        _collect(run, name, load)
    if run.metrics is not None:
        n, ids = len(run.metrics), run.metrics["id"].tolist()
        _collect(run, layout.DATA, lambda p: setattr(run, "records", read_scored_records(path, ids)))
        _collect(run, layout.EMBEDDINGS, lambda p: setattr(run, "embeddings", read_embeddings(p, n)))
        _collect(run, layout.TOKENS, lambda p: check_token_ids(p, ids))
    return run


def _collect(run: Run, name: str, load) -> None:
    if not (run.path / name).exists():
        return
    try:
        load(run.path / name)
    except (RunFileError, DataError, OSError, ValueError, pa.ArrowException) as exc:
        message = describe(exc)[0]  # the line the command line would print
        run.errors[name] = message if str(run.path / name) in message else f"{run.path / name}: {message}"


def read_ratings(path: Path) -> pd.DataFrame:
    """Stage-1 ratings as a frame of `id` and float `score` (NaN = no score), the last row per id.

    Parsed by Arrow into columns where it can (a log of millions of rows costs its two columns,
    not a dict per row); line by line otherwise (mixed types, a torn last line, a bad line), where
    `read_jsonl` names the problem."""
    try:
        checked_size(path, Limits())
        frame = _rating_columns(path)
    except (pa.ArrowException, DataError, OSError):
        frame = pd.DataFrame(read_jsonl(path))
        frame = frame[[c for c in ("id", "score") if c in frame.columns]]
    if frame.empty:
        return pd.DataFrame({"id": pd.Series(dtype=str), "score": pd.Series(dtype=float)})
    missing = {"id", "score"} - set(frame.columns)
    if missing:
        raise RunFileError(f"rows lack {sorted(missing)}; rate again")
    frame["score"] = pd.to_numeric(frame["score"], errors="coerce").astype(float)
    frame["id"] = frame["id"].astype(str)
    return frame.drop_duplicates("id", keep="last").reset_index(drop=True) if has_repeats(frame["id"]) else frame


_RATING_TYPES = pa_json.ParseOptions(explicit_schema=pa.schema([("id", pa.string()), ("score", pa.float64())]),
                                     unexpected_field_behavior="ignore")  # fmt: skip


def _rating_columns(path: Path) -> pd.DataFrame:
    """id and score, by Arrow: with their types given, a line's other fields are skipped, half the
    time of inferring all of them (1.9M ratings: 1.2 s against 2.5 s); inferred where the types
    differ (ids as numbers) or a column is null throughout (absent, or no rating ever got a score:
    inference tells which)."""
    try:
        table = pa_json.read_json(path, parse_options=_RATING_TYPES)
        if all(table.column(c).null_count < len(table) for c in ("id", "score")):
            return table.to_pandas()
    except pa.ArrowInvalid:
        pass
    table = pa_json.read_json(path)
    return table.select([c for c in ("id", "score") if c in table.column_names]).to_pandas()


def read_tokens(path: Path, sample_id: str) -> pd.DataFrame:
    """One sample's token rows; reads only the matching row groups' rows into memory."""
    if not path.exists():
        raise RunFileError(f"{path}: missing (the run was scored without token output)")
    try:
        table = pq.read_table(path, filters=[("id", "=", sample_id)])
    except (pa.ArrowException, OSError) as exc:
        raise RunFileError(f"{path}: cannot read Parquet ({exc}); score again") from exc
    missing = [c for c in TOKEN_COLUMNS if c not in table.column_names]
    if missing:
        raise RunFileError(f"{path}: missing columns {missing}; score again")
    return table.to_pandas().sort_values(["response", "pos"], ascending=[False, True]).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Per-stage counts and progress
# ---------------------------------------------------------------------------------------------


RUN_SETTINGS = ("bands", "sample_num", "atten_method", "seed", "exclude_flags")  # of its select stage, what the app starts from


def run_settings(run: Run) -> dict:
    """The settings the run itself used, as far as its files say: quality_threshold (its filter stage's)
    and its selection's bands (every metric's), sample_num, atten_method, seed, exclude_flags; a key
    is absent where not recorded. The app starts from these so it first shows the run's own selection.
    Read by `SelectConfig.from_dict`; a recorded selection it refuses (a hand-edited file) is left out."""
    found: dict = {}
    threshold = stage_part(run.manifest, "filter", "config").get("quality_threshold")
    if isinstance(threshold, (int, float)):
        found["quality_threshold"] = float(threshold)
    params = (run.selection or {}).get("params") or stage_part(run.manifest, "select", "config")
    recorded = {key: params[key] for key in RUN_SETTINGS if key in params}
    try:
        config = SelectConfig.from_dict(recorded, f"{run.path}: the run's selection settings")
    except SettingsError:
        return found
    return found | {key: config.bands() if key == "bands" else getattr(config, key) for key in recorded}


def selected_ids(selection: dict) -> list[str]:
    """Selected ids in pick order from a selection.json (written by `threeds.selection.apply.select_dir`)."""
    ids = selection.get("selected_ids")
    return [str(i) for i in ids] if isinstance(ids, list) else []


def read_progress(run_dir: str | os.PathLike) -> dict | None:
    """progress.json as written by the CLI ({stage, done, total, updated}); None if absent or torn."""
    path = Path(run_dir) / layout.PROGRESS
    try:
        value = loads_bounded(read_text(path))
    except (OSError, ValueError):  # absent, torn, not a file: no progress to show
        return None
    return value if isinstance(value, dict) else None

