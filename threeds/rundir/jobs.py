"""Background runs started from the app: start, follow, and stop one that may not want to stop.

A run is started detached (its own session, so its own process group) with its output in
`run.log` and its pid and argv in `job.json`. The run itself takes the run directory's lock
(`threeds.io.lock`), so a second writer is refused whoever started it. Stop escalates: SIGINT (the
CLI saves finished work and exits), then SIGTERM, then SIGKILL, each to the whole process group
after a grace period, and says which one ended it. A run ended by SIGTERM or SIGKILL cannot record
its end, so the stopper records it in the run's status.json (`stopped`, naming the signal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from threeds.errors import LockedError
from threeds.io.data import write_json
from threeds.io.lock import holder, locked
from threeds.rundir import layout
from threeds.rundir.progress import read_status, terminal_text, write_status

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
GRACE_SECONDS = (20.0, 10.0, 5.0)  # wait after each signal before sending the next
LOCK_WAIT = 60.0  # the stopper's wait for the lock of a run whose processes are gone (`_record_stop`)

_children: dict[int, subprocess.Popen] = {}  # started by this process: poll() reaps them


def start_run(argv: list[str], run_dir: str | os.PathLike, cwd: str | os.PathLike | None = None) -> int:
    """Start `argv` detached from the app (own session), logging to run.log; returns the pid.

    Detached so that it keeps running when the user leaves the page or the app restarts; the
    CLI is resumable, so starting the same command again continues a stopped run. Refused
    (`LockedError`) while a job of this directory runs or any process holds its lock.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if job_running(run_dir):
        raise LockedError(f"{run_dir}: a run is already in progress (pid {read_job(run_dir)['pid']})")
    pid = holder(run_dir)
    if pid is not None:
        raise LockedError(f"{run_dir}: the run directory is being written by pid {pid}; wait for it or stop it")
    with open(run_dir / layout.LOG, "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    job = {"pid": proc.pid, "argv": argv, "started": time.time()}
    write_json(run_dir / layout.JOB, job)
    _children[proc.pid] = proc
    return proc.pid


def read_job(run_dir: str | os.PathLike) -> dict | None:
    try:
        job = json.loads((Path(run_dir) / layout.JOB).read_text(encoding="utf-8"))
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


@dataclass(frozen=True)
class StopResult:
    """What `stop_run` did: the signals sent in order, and whether the run's processes are gone."""

    signals: tuple[str, ...]
    stopped: bool

    @property
    def message(self) -> str:
        if not self.signals:
            return "no run was in progress"
        sent = " then ".join(self.signals)
        if not self.stopped:
            return f"sent {sent}, but the run's processes are still there; stop them by hand"
        if len(self.signals) == 1:
            return "stopped (SIGINT): finished work is saved; Resume continues it"
        return (f"stopped by {self.signals[-1]} after {' and '.join(self.signals[:-1])} went unheeded (sent {sent}): "
                "records finished before are kept; Resume continues it")  # fmt: skip


def stop_run(run_dir: str | os.PathLike, grace: tuple[float, ...] = GRACE_SECONDS) -> StopResult:
    """Stop the background run's process group: SIGINT, then SIGTERM, then SIGKILL, each after the
    previous one's grace period passed with a process of the group still alive."""
    job = read_job(run_dir)
    if job is None or not job_running(run_dir):
        return StopResult((), stopped=True)
    pid, sent = job["pid"], []
    for sig, wait in zip(STOP_SIGNALS, grace):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        sent.append(sig.name)
        if _wait_group_gone(pid, wait):
            break
    result = StopResult(tuple(sent), stopped=not _group_alive(pid))
    if result.stopped and sent:
        _record_stop(Path(run_dir), pid, result)
    return result


def _record_stop(run_dir: Path, pid: int, result: StopResult) -> None:
    """Record the end of a run whose processes are gone but whose status.json still says `running`
    (SIGTERM and SIGKILL give it no chance to): `stopped`, with the signal that ended it. A run
    that recorded its own end is left alone, and so is a directory another writer took meanwhile
    (its lock still held after `LOCK_WAIT`: the killed run's lock is dropped as its last thread exits)."""
    try:
        with locked(run_dir, create=False, wait=LOCK_WAIT):
            status = read_status(run_dir)
            if status is None or status["state"] != "running":
                return
            last = result.signals[-1]  # the one that ended it
            write_status(run_dir, "stopped", exit_code=128 + signal.Signals[last].value, error=result.message, pid=pid)
    except LockedError:
        return


def _wait_group_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the group is left; our own child is reaped first."""
    if pgid in _children:
        _children[pgid].poll()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _live_members(pgid) != 0


def _live_members(pgid: int) -> int | None:
    """Processes of the group that are not zombies (dead, waiting for a parent to reap them);
    None without /proc, where any member counts as alive.

    A process counts as a zombie only once all its threads are: a killed multi-threaded
    process (numpy's, torch's, llama.cpp's thread pools) shows its main thread as a zombie
    while the other threads still exit, holding its open files, the run's lock among them."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    count = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(entry)
        if fields is None or int(fields[2]) != pgid:  # state, ppid, pgrp
            continue
        count += fields[0] != "Z" or _live_threads(entry) > 0
    return count


def _live_threads(process: Path) -> int:
    try:
        tasks = list((process / "task").iterdir())
    except OSError:
        return 0  # reaped while we looked
    return sum(1 for task in tasks if (fields := _stat(task)) is not None and fields[0] not in "ZX")


def _stat(entry: Path) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None when it exited while we looked."""
    try:
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def log_tail(run_dir: str | os.PathLike, lines: int = 20) -> str:
    """The last `lines` lines of run.log as a terminal shows them (progress bars' redraws and
    colour codes gone, `threeds.rundir.progress.terminal_text`)."""
    path = Path(run_dir) / layout.LOG
    if not path.exists():
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 16384))
        text = terminal_text(fh.read().decode("utf-8", errors="replace"))
    return "\n".join(text.rstrip("\n").split("\n")[-lines:])
