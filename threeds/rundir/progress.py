"""A run's progress and outcome as the app shows them, written by the run itself.

- `progress.json`: the running stage's counts, written as each record (or scored batch) finishes,
  at most every `ProgressFile.min_interval` seconds, with where the stage started so `eta_seconds`
  can estimate the time left from the work done so far.
- `status.json`: how the run ended, recorded by `threeds run`'s top level: `running`, `done` (every
  stage finished; `error` names an empty selection, exit code 3), `done_with_failures` (every stage
  finished but records failed: `failures` holds per stage the count and the first failed records,
  exit code 3), `stopped` (interrupted: the app's Stop button or Ctrl-C) or `failed` (the last error
  line and the exit code). A run killed outright cannot record its end: its status stays `running` with no
  process behind it (`job_state` says `killed`), unless the app's Stop killed it: the stopper
  then records `stopped` for it, naming the signal (`threeds.rundir.jobs.stop_run`).
- `Progress`: how every stage (rate, generate, score, train, eval, an experiment's units) reports
  how far it is, `report(done, total)` and, when its items differ in size, `work` of `work_total` in
  the unit its time is proportional to (an evaluation's tokens), so a time left follows the work, not
  the item count; its two adapters are `TerminalBar` (a tqdm bar on stderr) and `ProgressFile`
  (progress.json), `fan_out` gives one report to both.
- `terminal_text`: a log written for a terminal (tqdm's carriage returns, ANSI colours) as the
  lines a terminal would end up showing.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from threeds.io.data import write_json
from threeds.rundir import layout

STATES = ("running", "done", "done_with_failures", "stopped", "failed")


class Progress(Protocol):
    """How far a stage is: `done` of `total` counted items (records, steps, sequences, items) and, for
    items of unequal size, `work` of `work_total` in the unit their time is proportional to (tokens).
    The first report says where the stage starts (what an earlier run finished), later ones how far it is."""

    def __call__(self, done: int, total: int, work: float | None = None, work_total: float | None = None) -> None: ...


class TerminalBar:
    """The terminal adapter: a tqdm bar on stderr, made at the first report (which sets what was done
    before: tqdm's pace counts from there); over `work` when reported, the items then in its postfix."""

    def __init__(self, desc: str, unit: str, work_unit: str = "tok", enabled: bool = True) -> None:
        self.desc, self.unit, self.work_unit, self.enabled = desc, unit, work_unit, enabled
        self.bar = None

    def __call__(self, done: int, total: int, work: float | None = None, work_total: float | None = None) -> None:
        if not self.enabled:
            return
        n, whole = (done, total) if work is None or work_total is None else (int(work), int(work_total))
        if self.bar is None:
            from tqdm.auto import tqdm

            unit = self.unit if work is None else self.work_unit
            self.bar = tqdm(total=whole, initial=n, desc=self.desc, unit=unit, dynamic_ncols=True, unit_scale=work is not None)
        if work is not None:
            self.bar.set_postfix_str(f"{done:,}/{total:,} {self.unit}", refresh=False)
        self.bar.total = whole
        self.bar.update(n - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fan_out(*reports: Progress) -> Progress:
    """One report given to each of `reports` (a terminal bar and progress.json)."""

    def report(done: int, total: int, work: float | None = None, work_total: float | None = None) -> None:
        for each in reports:
            each(done, total, work, work_total)

    return report


class ProgressFile:
    """progress.json (at `path`) of one stage: {stage, done, total, unit, updated, started, done_at_start,
    phase, phase_since, and for items of unequal size work, work_total, work_at_start}; the file
    adapter of `Progress` (called as one). `phase` says what the stage is doing now ("loading the model", or the stage's
    own name once it works through its records) and `phase_since` since when (`phase_line`).

    `update` writes at most every `min_interval` seconds (an atomic, fsynced write per record
    would cost as much as the record's own log line at high concurrency); a count held back is
    written by a timer at the end of the interval, so a burst of records (a local batch finishing)
    never leaves the file behind until the next one; `close` writes at once.
    """

    def __init__(
        self, path: str | os.PathLike, stage: str, total: int, done: int = 0, unit: str = "records",
        min_interval: float = 0.5, clock: Callable[[], float] = time.time, ahead: list[dict] | None = None,
    ) -> None:  # fmt: skip
        """`ahead`: the stages after this one (`set_ahead`); None keeps those of the file it replaces."""
        self.path = Path(path)
        self.clock, self.min_interval = clock, min_interval
        now = clock()
        self.state = {"stage": stage, "done": done, "total": total, "unit": unit, "started": now, "done_at_start": done,
                      "phase": stage, "phase_since": now, "ahead": _ahead(self.path) if ahead is None else ahead}  # fmt: skip
        self.written = -float("inf")
        self.reported = False
        self.lock = threading.Lock()
        self.pending: threading.Timer | None = None
        self.update(done, force=True)

    def update(self, done: int, force: bool = False) -> None:
        with self.lock:
            self.state["done"] = done
            now = self.clock()
            wait = self.written + self.min_interval - now
            if force or wait <= 0:
                self._write(now)
            elif self.pending is None:
                self.pending = threading.Timer(wait, self._flush)
                self.pending.daemon = True
                self.pending.start()

    def phase(self, text: str) -> None:
        """A new phase, written at once; the stage's pace (`eta_seconds`) counts from the stage's own phase."""
        with self.lock:
            now = self.clock()
            self.state.update(phase=text, phase_since=now)
            if text == self.state["stage"]:  # loading the model or the preflight is not part of the stage's pace
                self.state.update(started=now, done_at_start=self.state["done"])
                if "work" in self.state:
                    self.state["work_at_start"] = self.state["work"]
        self.update(self.state["done"], force=True)

    def __call__(self, done: int, total: int, work: float | None = None, work_total: float | None = None) -> None:
        """A `Progress` report; the first one marks where the stage's pace starts (what was done before)."""
        with self.lock:
            first = not self.reported
            self.reported = True
            self.state["total"] = total
            if work is not None and work_total is not None:
                self.state.update(work=work, work_total=work_total)
            if first:
                self.state.update(started=self.clock(), done_at_start=done)
                if work is not None:
                    self.state["work_at_start"] = work
        self.update(done, force=first)

    def close(self) -> None:
        self.update(self.state["done"], force=True)

    def _flush(self) -> None:
        with self.lock:
            self.pending = None
            self._write(self.clock())

    def _write(self, now: float) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        write_json(self.path, {**self.state, "updated": now})
        self.written = now


def _ahead(path: Path) -> list[dict]:
    try:
        ahead = json.loads(path.read_text(encoding="utf-8")).get("ahead")
    except (OSError, ValueError, AttributeError):
        return []
    return ahead if isinstance(ahead, list) else []


def set_ahead(path: str | os.PathLike, ahead: list[dict]) -> None:
    """Record in progress.json (between stages: no ProgressFile is writing it) the stages still to
    come, each {stage, units, seconds_per_unit}: the pace measured when that stage last ran in this
    run directory, or None when it never did. The next stage's ProgressFile keeps them."""
    path = Path(path)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    write_json(path, {**(state if isinstance(state, dict) else {}), "ahead": ahead})


def run_time_left(progress: dict) -> tuple[float, list[str]] | None:
    """(seconds left for the whole run, the stages still to come whose pace is not measured yet), as
    of the last update: the running stage's `eta_seconds` plus each stage ahead at its measured pace;
    None while the running stage has no pace yet."""
    now = eta_seconds(progress)
    if now is None:
        return None
    unmeasured = []
    for stage in progress.get("ahead") or []:
        pace = stage.get("seconds_per_unit")
        if isinstance(pace, (int, float)):
            now += pace * int(stage.get("units", 0))
        else:
            unmeasured.append(str(stage.get("stage")))
    return now, unmeasured


def eta_seconds(progress: dict) -> float | None:
    """Seconds left, as of the last update, for the stage in `progress` at the pace of the work
    done since it started (records resumed from an earlier run do not count); None before the
    first one finished or for a progress.json without the start (older runs)."""
    pace = seconds_per_unit(progress)
    return None if pace is None else units_left(progress) * pace


def seconds_per_unit(progress: dict) -> float | None:
    """Seconds per counted unit (record, step, item) of the stage since it started. When it records
    its work (items of unequal size: an evaluation runs its longest items first), an item counts as
    its share of the work, so the pace of the long first items does not stretch the short rest."""
    try:
        done, total = int(progress["done"]), int(progress["total"])
        elapsed = float(progress["updated"]) - float(progress["started"])
        if _weighted(progress):
            new = (float(progress["work"]) - float(progress.get("work_at_start", 0))) * total / float(progress["work_total"])
        else:
            new = done - int(progress.get("done_at_start", 0))
    except (KeyError, TypeError, ValueError):
        return None
    if new <= 0 or elapsed <= 0:
        return None
    return elapsed / new


def units_left(progress: dict) -> float:
    """Counted units still to do; for a stage that records its work, the share of the work left."""
    total = int(progress.get("total", 0))
    if _weighted(progress):
        return max(total * (1 - float(progress["work"]) / float(progress["work_total"])), 0.0)
    return float(max(total - int(progress.get("done", 0)), 0))


def _weighted(progress: dict) -> bool:
    return all(isinstance(progress.get(k), (int, float)) for k in ("work", "work_total")) and progress["work_total"] > 0


# A stage's own phase, as the phase line words it: (verb, unit)
PHASE_WORDS = {"rate": ("rating", "record"), "generate": ("writing A' for", "record"), "score": ("scoring", "sequence")}


def phase_line(progress: dict, now: float) -> str | None:
    """What the run is doing now and for how long: "loading the model, 40 s so far", "rating record
    3 of 10, 2 min 5 s so far"; None for a progress.json without a phase (older runs)."""
    phase, since = progress.get("phase"), progress.get("phase_since")
    if not isinstance(phase, str) or not isinstance(since, (int, float)):
        return None
    so_far = f"{duration(max(now - since, 0.0))} so far"
    if phase in PHASE_WORDS:
        verb, unit = PHASE_WORDS[phase]
        done, total = int(progress.get("done", 0)), int(progress.get("total", 0))
        if done < total:
            return f"{verb} {unit} {done + 1:,} of {total:,}, {so_far}"
    return f"{phase}, {so_far}"


def duration(seconds: float) -> str:
    """'45 s', '4 min 30 s', '2 h 5 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def write_status(
    run_dir: str | os.PathLike, state: str, exit_code: int | None = None, error: str | None = None,
    pid: int | None = None, failures: dict | None = None, retry_error: str | None = None,
) -> None:  # fmt: skip
    """Record the run's state (one of STATES) with the run's pid (default: this process's) and, for
    `done_with_failures`, the failed records per stage (and `retry_error`: why a retry of them stopped)."""
    if state not in STATES:
        raise ValueError(f"state {state!r}: not one of {STATES}")
    status = {"state": state, "exit_code": exit_code, "error": error, "pid": pid or os.getpid(), "updated": time.time()}
    if failures:
        status["failures"] = failures
    if retry_error:
        status["retry_error"] = retry_error
    write_json(Path(run_dir) / layout.STATUS, status)


def read_status(run_dir: str | os.PathLike) -> dict | None:
    """status.json, or None when absent, torn or not a status (runs made before it existed)."""
    try:
        status = json.loads((Path(run_dir) / layout.STATUS).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return status if isinstance(status, dict) and status.get("state") in STATES else None


def job_state(status: dict | None, running: bool) -> str:
    """What to tell the user: `running`, `done`, `done_with_failures`, `stopped`, `failed`, `killed`
    (recorded as running but no process is left) or `unknown` (no status recorded, e.g. an older run)."""
    if running:
        return "running"
    if status is None:
        return "unknown"
    return "killed" if status["state"] == "running" else status["state"]


_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def terminal_text(text: str) -> str:
    """`text` as a terminal shows it: escape sequences removed, and on each line only what the
    last carriage return left (a progress bar's final state, not every redraw)."""
    lines = []
    for line in _ANSI.sub("", text).split("\n"):
        parts = [p for p in line.split("\r") if p] or [""]
        lines.append(_CONTROL.sub("", parts[-1]))
    return "\n".join(lines)
