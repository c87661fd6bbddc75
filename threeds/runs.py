"""Run directories as the app sees them: list, load with validation, start in the background.

A run may be partial (Stage 1 only, still scoring) or hold a damaged file. Loading never stops
at the first bad file: each file's problem is kept in `Run.errors` with a message that names the
file and what to do, so one page can report a corrupt file while the others keep working.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from threeds.data import DataError, read_jsonl, read_records
from threeds.names import METRIC_COLUMNS, TOKEN_COLUMNS
from threeds.rate import quality_mask
from threeds.progress import terminal_text

DEFAULT_CACHE = Path("cache")
NOT_RUNS = {"models", "uploads"}
RUN_FILES = (
    "manifest.json", "ratings.jsonl", "rejects.jsonl", "metrics.parquet", "selection.json",
    "data.jsonl", "embeddings.npy", "tokens.parquet",
)  # fmt: skip
JOB_FILE = "job.json"  # written by `start_run`: pid and command of a background run
LOG_FILE = "run.log"  # stdout + stderr of a background run


class RunFileError(ValueError):
    """One file of a run directory is missing, unreadable or inconsistent with the others."""


@dataclass
class Run:
    """The loaded files of one run directory; `None` where a stage has not written its file."""

    path: Path
    key: tuple = ()  # `run_key` taken before loading: what the loaded files correspond to
    manifest: dict = field(default_factory=dict)
    ratings: pd.DataFrame | None = None  # Stage 1: id, score (NaN when unrated), ...
    metrics: pd.DataFrame | None = None  # Stage 2, one row per scored sample
    records: list[dict] | None = None  # data.jsonl, aligned with metrics rows
    embeddings: np.ndarray | None = None  # [n, hidden] float32, aligned with metrics rows
    selection: dict | None = None
    rejects: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # file name -> what is wrong

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def row_of(self) -> dict[str, int]:
        """Sample id -> row of metrics / records / embeddings."""
        return {} if self.metrics is None else {sid: i for i, sid in enumerate(self.metrics["id"])}

    @cached_property
    def input_records(self) -> dict[str, dict]:
        """Records by id: the scored ones plus, for Stage-1-only ids, those of the input file.

        Stage 1 rates every input record but `data.jsonl` holds only the scored ones; the
        dropped ones' text is read back from the input file named in the manifest, if it is there
        (duplicate ids renamed, as a run that accepted them did).
        """
        found = {r["id"]: r for r in self.records or []}
        source = self.input_path
        if self.ratings is not None and source is not None:
            try:
                found = {r["id"]: r for r in read_records(source, duplicate_ids="rename")[0]} | found
            except (DataError, OSError) as exc:
                self.errors.setdefault("input data", f"{source}: {exc}")
        return found

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
        row = self.row_of.get(sample_id)
        if row is not None and self.records is not None:
            return self.records[row]
        return self.input_records.get(sample_id)

    def tokens(self, sample_id: str) -> pd.DataFrame:
        """The rows of tokens.parquet for one sample (A then A', by position)."""
        return read_tokens(self.path / "tokens.parquet", sample_id)


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
        ("manifest.json", lambda: setattr(run, "manifest", _read_json(path / "manifest.json"))),
        ("ratings.jsonl", lambda: setattr(run, "ratings", read_ratings(path / "ratings.jsonl"))),
        ("rejects.jsonl", lambda: setattr(run, "rejects", len(read_jsonl(path / "rejects.jsonl")))),
        ("metrics.parquet", lambda: setattr(run, "metrics", read_metrics(path / "metrics.parquet"))),
        ("selection.json", lambda: setattr(run, "selection", _read_json(path / "selection.json"))),
    ]
    for name, load in loaders:
        _collect(run, name, load)
    if run.metrics is not None:
        n, ids = len(run.metrics), run.metrics["id"].tolist()
        _collect(run, "data.jsonl", lambda: setattr(run, "records", read_scored_records(path / "data.jsonl", ids)))
        _collect(run, "embeddings.npy", lambda: setattr(run, "embeddings", read_embeddings(path / "embeddings.npy", n)))
    return run


def _collect(run: Run, name: str, load) -> None:
    if not (run.path / name).exists():
        return
    try:
        load()
    except (RunFileError, DataError, OSError, ValueError, pa.ArrowException) as exc:
        run.errors[name] = f"{run.path / name}: {exc}"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunFileError(f"corrupt JSON ({exc}); delete the file and run the stage again") from exc
    if not isinstance(value, dict):
        raise RunFileError(f"expected a JSON object, got {type(value).__name__}")
    return value


def read_ratings(path: Path) -> pd.DataFrame:
    """Stage-1 ratings as a frame with at least `id` and float `score` (NaN = no score)."""
    rows = read_jsonl(path)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame({"id": pd.Series(dtype=str), "score": pd.Series(dtype=float)})
    missing = {"id", "score"} - set(frame.columns)
    if missing:
        raise RunFileError(f"rows lack {sorted(missing)}; rate again")
    frame["score"] = pd.to_numeric(frame["score"], errors="coerce").astype(float)
    frame["id"] = frame["id"].astype(str)
    return frame.drop_duplicates("id", keep="last").reset_index(drop=True)


def read_metrics(path: Path) -> pd.DataFrame:
    try:
        frame = pq.read_table(path).to_pandas()
    except pa.ArrowException as exc:
        raise RunFileError(f"cannot read Parquet ({exc}); score again") from exc
    missing = [c for c in METRIC_COLUMNS if c not in frame.columns]
    if missing:
        raise RunFileError(f"missing columns {missing}; score again with this version of threeds")
    if frame["id"].duplicated().any():
        raise RunFileError(f"duplicate ids, e.g. {frame['id'][frame['id'].duplicated()].iloc[0]!r}; score again")
    return frame


def read_scored_records(path: Path, ids: list[str]) -> list[dict]:
    records = read_jsonl(path)
    if [r.get("id") for r in records] != ids:
        raise RunFileError("its ids do not match metrics.parquet row for row; score again")
    return records


def read_embeddings(path: Path, n: int) -> np.ndarray:
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise RunFileError(f"not a readable .npy array ({exc}); score again") from exc
    if emb.ndim != 2 or emb.shape[0] != n:
        raise RunFileError(f"shape {emb.shape} does not match {n} rows of metrics.parquet; score again")
    return np.asarray(emb, dtype=np.float32)


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


def stage_counts(run: Run) -> dict[str, int | None]:
    """How many samples each stage saw and kept (None where the stage has not run)."""
    stages = run.manifest.get("stages") or {}
    settings = run_settings(run)
    rated = kept = None
    if run.ratings is not None:
        scores = run.ratings["score"]
        rated = int(scores.notna().sum())
        if "quality_threshold" in settings:
            kept = int(quality_mask(scores, settings["quality_threshold"]).sum())
    generated = ((stages.get("generate") or {}).get("summary") or {}).get("done")
    in_bands = ((run.selection or {}).get("report") or {}).get("n_kept")
    return {
        "input records": _first_int(((stages.get("rate") or {}).get("data") or {}).get("n_records"), (run.manifest.get("data") or {}).get("n_records")),
        "rejected": run.rejects,
        "rated (Stage 1)": rated,
        "kept by quality": kept,
        "A' generated": _first_int(generated),
        "scored (Stage 2)": None if run.metrics is None else len(run.metrics),
        "in all bands": _first_int(in_bands),
        "selected": None if run.selection is None else len(selected_ids(run.selection)),
    }


def _first_int(*values) -> int | None:
    return next((int(v) for v in values if isinstance(v, (int, float))), None)


def run_settings(run: Run) -> dict:
    """The settings the run itself used, as far as its files say: quality_threshold, bands,
    sample_num, atten_method, seed. The app starts from these so it first shows the run's own
    selection."""
    stages = run.manifest.get("stages") or {}
    found: dict = {}
    threshold = ((stages.get("filter") or {}).get("config") or {}).get("quality_threshold")
    if isinstance(threshold, (int, float)):
        found["quality_threshold"] = float(threshold)
    params = (run.selection or {}).get("params") or ((stages.get("select") or {}).get("config")) or {}
    bands = params.get("bands")
    if isinstance(bands, dict):
        found["bands"] = {m: (float(b[0]), float(b[1])) for m, b in bands.items() if isinstance(b, list | tuple) and len(b) == 2}
    for key, kind in (("sample_num", int), ("atten_method", str), ("seed", int)):
        if isinstance(params.get(key), kind):
            found[key] = params[key]
    return found


def selected_ids(selection: dict) -> list[str]:
    """Selected ids in pick order from a selection.json (written by `threeds.select.select_run`)."""
    ids = selection.get("selected_ids")
    return [str(i) for i in ids] if isinstance(ids, list) else []


def read_progress(run_dir: str | os.PathLike) -> dict | None:
    """progress.json as written by the CLI ({stage, done, total, updated}); None if absent or torn."""
    path = Path(run_dir) / "progress.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------------------
# Percentile ranks (the inspector's "where does this sample sit")
# ---------------------------------------------------------------------------------------------


def percentile_rank(values: np.ndarray, x: float) -> float:
    """Percent of the non-NaN `values` at or below `x` (NaN for NaN `x`)."""
    values = np.asarray(values, dtype=float)
    values = np.sort(values[~np.isnan(values)])
    if np.isnan(x) or values.size == 0:
        return float("nan")
    return 100.0 * np.searchsorted(values, x, side="right") / values.size


# ---------------------------------------------------------------------------------------------
# Background runs
# ---------------------------------------------------------------------------------------------


def start_run(argv: list[str], run_dir: str | os.PathLike, cwd: str | os.PathLike | None = None) -> int:
    """Start `argv` detached from the app (own session), logging to run.log; returns the pid.

    Detached so that it keeps running when the user leaves the page or the app restarts; the
    CLI is resumable, so starting the same command again continues a stopped run.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if job_running(run_dir):
        raise RuntimeError(f"{run_dir}: a run is already in progress (pid {read_job(run_dir)['pid']})")
    with open(run_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    job = {"pid": proc.pid, "argv": argv, "started": time.time()}
    (run_dir / JOB_FILE).write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
    _children[proc.pid] = proc
    return proc.pid


_children: dict[int, subprocess.Popen] = {}  # started by this process: poll() reaps them


def read_job(run_dir: str | os.PathLike) -> dict | None:
    try:
        job = json.loads((Path(run_dir) / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return job if isinstance(job, dict) and isinstance(job.get("pid"), int) else None


def job_running(run_dir: str | os.PathLike) -> bool:
    """Whether the background run recorded in job.json is still alive."""
    job = read_job(run_dir)
    if job is None:
        return False
    pid = job["pid"]
    if pid in _children:
        return _children[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _cmdline_matches(pid, job.get("argv") or [])


def _cmdline_matches(pid: int, argv: list[str]) -> bool:
    """Guard against a recycled pid: the live process must be the command we started."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid
    return [c.decode(errors="replace") for c in cmdline[:-1]] == argv


def stop_run(run_dir: str | os.PathLike) -> bool:
    """Interrupt the background run (SIGINT: the CLI saves finished work); True if one was running."""
    job = read_job(run_dir)
    if job is None or not job_running(run_dir):
        return False
    os.killpg(job["pid"], signal.SIGINT)
    return True


def log_tail(run_dir: str | os.PathLike, lines: int = 20) -> str:
    """The last `lines` lines of run.log as a terminal shows them (progress bars' redraws and
    colour codes gone, `threeds.progress.terminal_text`)."""
    path = Path(run_dir) / LOG_FILE
    if not path.exists():
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 16384))
        text = terminal_text(fh.read().decode("utf-8", errors="replace"))
    return "\n".join(text.rstrip("\n").split("\n")[-lines:])
