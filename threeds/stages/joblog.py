"""The per-record job log behind rating and A' generation: ask the model once per record and keep
every answer the moment it arrives.

A job's log is a JSONL file with one row per finished record: `id`, the stage's result fields,
`backend`, `model`, `seconds`, `attempts`, `error` (None when it worked) and `key`, a hash of what
produced the row (backend signature, token budget, exact prompt). Each row is appended and fsynced
when its reply arrives, so a kill loses nothing finished. A rerun keeps the rows whose key still
matches, drops failed rows (their records are asked again) and rewrites the log atomically before
appending, so every id appears once.

A reply that came back without a usable result and will be asked again (a rating without a score)
is logged at once too, as a `pending` row with its `round`: a run stopped before the re-ask keeps
it, and the rerun goes on with the re-ask instead of asking the first question again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from threeds.errors import ThreedsError
from threeds.io.data import append_jsonl, read_jsonl, write_jsonl
from threeds.io.lock import locked
from threeds.model.backends import Backend, Reply
from threeds.rundir.progress import ProgressFile, TerminalBar, fan_out

log = logging.getLogger(__name__)


class StaleResultsError(ThreedsError, RuntimeError):
    """The log holds results made from other prompts or settings; the message says what to do."""


@dataclass(frozen=True)
class Task:
    id: str
    prompt: str
    key: str


@dataclass(frozen=True)
class Job:
    """What differs between stages: the result fields of a reply and whether to re-ask."""

    stage: str
    to_fields: Callable[[Reply], dict]  # must include "error": None when the reply is usable
    reask: Callable[[str], str] | None = None  # prompt for a reply that came back but was unusable
    reasks: int = 0


def make_tasks(records: Sequence[dict], prompts: Sequence[str], backend: Backend, max_new_tokens: int) -> list[Task]:
    sig = json.dumps([backend.signature, max_new_tokens], sort_keys=True)
    return [
        Task(rec["id"], p, hashlib.sha256(f"{sig}\n{p}".encode()).hexdigest()[:16]) for rec, p in zip(records, prompts)
    ]


def resume(log_path: Path, tasks: Sequence[Task], overwrite: bool) -> tuple[list[Task], dict[str, dict]]:
    """(the tasks still to do, id -> the latest `pending` row of those awaiting a re-ask); compacts
    the log to one good row per id, or the latest pending one (atomically).

    Rows of ids outside `tasks` are kept untouched (e.g. records a stricter filter left out).
    Rows whose key differs were made another way: an error unless `overwrite`, then dropped.
    """
    rows = read_jsonl(log_path) if log_path.exists() else []
    current = {t.id: t.key for t in tasks}
    keep, done, stale, pending = [], set(), 0, {}
    for row in rows:
        rid = row.get("id")
        if rid not in current:
            keep.append(row)
        elif row.get("key") != current[rid]:
            stale += 1
        elif row.get("error") is None and rid not in done:
            done.add(rid)
            keep.append(row)
        elif row.get("pending"):
            pending[rid] = row
        else:  # a final failure: the record is asked from the start again
            pending.pop(rid, None)
    if stale and not overwrite:
        raise StaleResultsError(
            f"{log_path}: {stale} results were made with another prompt, model, settings or record text; "
            "pass --overwrite to redo them or choose another output"
        )
    if stale:
        log.warning("%s: %d results were made another way; redoing them", log_path, stale)
    pending = {rid: row for rid, row in pending.items() if rid not in done}
    keep += pending.values()
    if len(keep) != len(rows):
        write_jsonl(log_path, keep)
    return [t for t in tasks if t.id not in done], pending


FIRST_FAILURES = 5  # failed records a summary names (id, error, the start of the reply)


class JobProgress:
    """The run's counts, the first failed records, and their report (`threeds.rundir.progress.Progress`)
    to a terminal bar and to `progress_path` (progress.json, which the app polls) if given."""

    def __init__(
        self, stage: str, log_path: Path, total: int, done_before: int, enabled: bool, progress_path: Path | None
    ) -> None:  # fmt: skip
        self.stage, self.log_path, self.total = stage, log_path, total
        self.before, self.ok, self.failed = done_before, 0, 0
        self.first_failures: list[dict] = []
        self.started = time.monotonic()
        self.bar = TerminalBar(stage, "rec", enabled=enabled)
        self.file = ProgressFile(progress_path, stage, total, done_before) if progress_path is not None else None
        self.report = fan_out(self.bar, self.file) if self.file is not None else self.bar
        self.report(done_before, total)

    def phase(self, text: str) -> None:
        """What the stage is doing now ("loading the model", the stage's own name once it asks)."""
        if self.file is not None:
            self.file.phase(text)

    def update(self, row: dict) -> None:
        ok = row["error"] is None
        self.ok += ok
        self.failed += not ok
        if not ok and len(self.first_failures) < FIRST_FAILURES:
            raw = row.get("raw")
            self.first_failures.append({"id": row["id"], "error": row["error"], **({"raw": raw[:200]} if isinstance(raw, str) else {})})
        self.report(self.before + self.ok + self.failed, self.total)  # per record; the file's writes rate-limited

    def close(self) -> dict:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        return {
            "stage": self.stage, "total": self.total, "done": self.before + self.ok, "failed": self.failed,
            "skipped": self.before, "new": self.ok, "seconds": round(time.monotonic() - self.started, 3),
            "log": str(self.log_path), "first_failures": self.first_failures,
        }  # fmt: skip


Check = Callable[[list[dict]], None]


def run_job(
    job: Job, tasks: Sequence[Task], backend: Backend, log_path: Path, max_new_tokens: int,
    *, overwrite: bool = False, progress: bool = True, progress_path: Path | None = None,
    check_first: tuple[int, Check] | None = None,
) -> dict:  # fmt: skip
    """Ask the backend for every task not yet done; append each row as it finishes; summary dict.

    `check_first` (n, check): ask the first n tasks to do on their own and give their rows to
    `check`, which raises to stop before the rest are asked (the run's preflight). Holds the lock
    of the log's folder (`threeds.io.lock`): two jobs appending to one log would each ask for every record.
    """
    log_path = Path(log_path)
    with locked(log_path.parent):
        todo, pending = resume(log_path, tasks, overwrite)
        bar = JobProgress(job.stage, log_path, len(tasks), len(tasks) - len(todo), progress, progress_path)
        # seconds and attempts of earlier rounds, and the round to go on with, per id
        spent = {rid: (float(row.get("seconds") or 0), int(row.get("attempts") or 0)) for rid, row in pending.items()}
        start = {rid: min(int(row.get("round", 0)) + 1, job.reasks) for rid, row in pending.items()}
        try:
            if todo:
                _load(backend, bar)
            if check_first is not None and todo:
                head, todo = todo[: check_first[0]], todo[check_first[0] :]
                bar.phase(f"preflight: trying the model on the first {len(head)} records")
                written: list[dict] = []
                _ask_rounds(job, head, start, backend, log_path, max_new_tokens, bar, spent, written)
                check_first[1](written)
                bar.phase(bar.stage)
            _ask_rounds(job, todo, start, backend, log_path, max_new_tokens, bar, spent, None)
        finally:
            summary = bar.close()
        if job.reasks:
            _settle(log_path)
    return summary


def _settle(log_path: Path) -> None:
    """Drop the pending rows a later row of their id settled, so a finished job leaves one row per id."""
    rows = read_jsonl(log_path) if log_path.exists() else []
    last = {row.get("id"): i for i, row in enumerate(rows)}
    keep = [row for i, row in enumerate(rows) if not row.get("pending") or last[row.get("id")] == i]
    if len(keep) != len(rows):
        write_jsonl(log_path, keep)


def _load(backend: Backend, bar: JobProgress) -> None:
    """Load an in-process model now, so progress.json can say that this is what takes the time."""
    load = getattr(backend, "load", None)
    if load is not None:
        bar.phase("loading the model")
        load()
    bar.phase(bar.stage)


def _ask_rounds(
    job: Job, todo: list[Task], start: dict[str, int], backend: Backend, log_path: Path, max_new_tokens: int,
    bar: JobProgress, spent: dict[str, tuple[float, int]], written: list[dict] | None,
) -> None:  # fmt: skip
    """The first question, then the re-asks of the replies that came back unusable; a task resumed
    from a pending row joins at the round after it."""
    for round_ in range(job.reasks + 1):
        asking = [t for t in todo if start.get(t.id, 0) <= round_]
        if asking:
            prompts = [t.prompt if round_ == 0 else job.reask(t.prompt) for t in asking]
            retry = _ask_round(job, asking, prompts, backend, log_path, max_new_tokens, bar, spent, round_, written)
            todo = [t for t in todo if start.get(t.id, 0) > round_] + retry


def _ask_round(
    job: Job, tasks: list[Task], prompts: list[str], backend: Backend, log_path: Path, max_new_tokens: int,
    bar: JobProgress, spent: dict[str, tuple[float, int]], round_: int, written: list[dict] | None,
) -> list[Task]:  # fmt: skip
    """One pass over `tasks`; returns those whose reply came back unusable, to ask again (their reply
    is logged at once as a `pending` row, so a stop before the re-ask keeps it)."""
    retry: list[Task] = []
    final = round_ == job.reasks

    def on_reply(i: int, reply: Reply) -> None:
        task = tasks[i]
        seconds, attempts = spent.get(task.id, (0.0, 0))
        seconds, attempts = seconds + reply.seconds, attempts + reply.attempts
        fields = job.to_fields(reply)
        row = {"id": task.id, **fields, "backend": backend.name, "model": reply.model or backend.label,
               "seconds": round(seconds, 4), "attempts": attempts, "key": task.key}  # fmt: skip
        if reply.error is None and fields["error"] is not None and not final:
            spent[task.id] = (seconds, attempts)
            retry.append(task)
            append_jsonl(log_path, [{**row, "pending": True, "round": round_}])
            return
        append_jsonl(log_path, [row])
        bar.update(row)
        if written is not None:
            written.append(row)

    backend.chat(prompts, max_new_tokens, on_reply)
    return retry


def good_rows(log_path: Path, tasks: Sequence[Task]) -> dict[str, dict]:
    """id -> the successful, current row of each task that has one."""
    keys = {t.id: t.key for t in tasks}
    rows = read_jsonl(log_path) if Path(log_path).exists() else []
    return {r["id"]: r for r in rows if r.get("error") is None and keys.get(r.get("id")) == r.get("key")}


def failed_rows(log_path: Path) -> list[dict]:
    """The rows of records that failed for good (not those awaiting a re-ask), last row per id."""
    rows = read_jsonl(log_path) if Path(log_path).exists() else []
    last = {r.get("id"): r for r in rows}
    return [r for r in last.values() if r.get("error") is not None and not r.get("pending")]
