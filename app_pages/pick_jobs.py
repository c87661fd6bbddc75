"""k-center picks that no control waits for: large ones are made by a background process.

At the paper's shape the band survivors are ~240k x 4096: k-center takes a minute, and its rows
are gigabytes. A selection whose candidates hold more than INLINE_WORK values (rows x dim) is
therefore picked by a child process (`python -m threeds.selection.pick_job`) while the page shows
the band survivors and says the picks are coming (`pending_panel`: a progress bar that reruns
the page once they are in). Smaller ones are picked in the page, as before.

One job runs at a time per server: a request for other picks (a band moved again) ends the
running job, so a dragged slider leaves one job behind, not one per step. Finished picks are
kept per set of candidates (the longest order made; a smaller sample_num slices it) and the job
leaves its order in the run's `pick_orders/`, so a restarted server continues it instead of
starting over.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import streamlit as st

from threeds.rundir import layout

# candidates x dim up to which picks are made in the page (well under a second of k-center);
# THREEDS_INLINE_PICKS changes it (tests set 0 to see the background path on a small run)
INLINE_WORK = int(os.environ.get("THREEDS_INLINE_PICKS", 20_000_000))
KEEP_DONE = 32  # finished pick orders kept in memory (a few thousand row numbers each)
POLL_S = 1.0  # how often a page waiting for picks looks at the job


def inline(n_candidates: int, dim: int) -> bool:
    """Whether picks over these candidates are cheap enough to make while the page waits."""
    return n_candidates * dim <= INLINE_WORK


@dataclass
class Job:
    """One background k-center run: its process and its folder (inputs, progress.json, picks.npy, log)."""

    key: tuple
    k: int
    folder: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)

    def progress(self) -> dict:
        try:
            return json.loads((self.folder / layout.PROGRESS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def error(self) -> str:
        """The job's own line (stderr's last), or its exit status."""
        lines = (self.folder / layout.PICK_JOB_LOG).read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return lines[-1] if lines else f"exit status {self.proc.returncode}"


class Board:
    """The server's pick jobs and finished pick orders, shared by every session."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: Job | None = None
        self.failed: dict[tuple, str] = {}
        self.done: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def ready(self, key: tuple, k: int) -> np.ndarray | None:
        """The first k picks for `key` if made (k at most the number of candidates)."""
        with self.lock:
            self._collect()
            order = self.done.get(key)
            return None if order is None or len(order) < k else order[:k]

    def request(self, key: tuple, k: int, start) -> Job | None:
        """The job making at least k picks for `key`, started (`start(folder)` -> Popen) if
        none is; the running job for other picks ends. None when that key's job failed."""
        with self.lock:
            self._collect()
            if key in self.failed:
                return None
            job = self.running
            if job is not None and job.key == key and job.k >= k:
                return job
            if job is not None:
                stop(job)
            folder = Path(tempfile.mkdtemp(prefix="threeds-picks-"))
            self.running = Job(key, k, folder, start(folder))
            return self.running

    def failure(self, key: tuple) -> str | None:
        with self.lock:
            self._collect()
            return self.failed.get(key)

    def retry(self, key: tuple) -> None:
        with self.lock:
            self.failed.pop(key, None)

    def _collect(self) -> None:
        """Take the running job's picks (or its failure) once it has ended."""
        job = self.running
        if job is None or job.proc.poll() is None:
            return
        self.running = None
        try:
            if job.proc.returncode == 0:
                self.done[job.key] = np.load(job.folder / layout.PICK_JOB_PICKS, allow_pickle=False)
                self.done.move_to_end(job.key)
                while len(self.done) > KEEP_DONE:
                    self.done.popitem(last=False)
            else:
                self.failed[job.key] = job.error()
        except (OSError, ValueError) as exc:
            self.failed[job.key] = f"the job's picks are unreadable ({exc})"
        finally:
            shutil.rmtree(job.folder, ignore_errors=True)


def stop(job: Job) -> None:
    """End a job that is no longer wanted (its process group: the job and nothing else)."""
    if job.proc.poll() is None:
        job.proc.terminate()
        try:
            job.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()
    shutil.rmtree(job.folder, ignore_errors=True)


@st.cache_resource(show_spinner=False)
def board() -> Board:
    """The server's one board; its running job ends with the server."""
    found = Board()
    atexit.register(lambda: found.running is not None and stop(found.running))
    return found


def job_argv(folder: Path, run_dir: Path, rows: int, seed: int, k: int) -> list[str]:
    """The job's command line (its inputs and outputs in `folder`)."""
    candidates, initial = (str(folder / name) for name in layout.PICK_JOB_INPUTS)
    return [
        sys.executable, "-m", "threeds.selection.pick_job", "--run", str(run_dir), "--rows", str(rows), "--candidates", candidates,
        "--initial", initial, "--seed", str(seed), "--k", str(k), "--out", str(folder / layout.PICK_JOB_PICKS),
        "--progress", str(folder / layout.PROGRESS),
    ]  # fmt: skip


def launcher(run_dir: Path, rows: int, candidates: np.ndarray, initial: np.ndarray, seed: int, k: int):
    """`start(folder)` for `Board.request`: writes the job's inputs and starts its process."""

    def start(folder: Path) -> subprocess.Popen:
        for name, array in zip(layout.PICK_JOB_INPUTS, (candidates, initial)):
            np.save(folder / name, array, allow_pickle=False)
        with open(folder / layout.PICK_JOB_LOG, "wb") as log:
            return subprocess.Popen(job_argv(folder, run_dir, rows, seed, k), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    return start
