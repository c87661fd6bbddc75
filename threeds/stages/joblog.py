"""The per-record job log behind rating and A' generation: ask the model once per record and keep
every answer the moment it arrives.

A job's log is a JSONL file with one row per finished record: `id`, the stage's result fields,
`backend`, `model`, `seconds`, `attempts`, `error` (None when it worked) and `key`, a hash of what
produced the row (backend signature, token budget, exact prompt). Each row is appended and fsynced
when its reply arrives, so a kill loses nothing finished. A rerun keeps the rows whose key still
matches, drops failed rows (their records are asked again) and rewrites the log atomically before
appending, so every id appears once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from threeds.errors import ThreedsError
from threeds.io.data import append_jsonl, read_jsonl, write_jsonl
from threeds.io.lock import locked
from threeds.model.backends import Backend, Reply
from threeds.rundir.progress import ProgressFile

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


def resume(log_path: Path, tasks: Sequence[Task], overwrite: bool) -> list[Task]:
    """The tasks still to do; compacts the log to one good row per id (atomically).

    Rows of ids outside `tasks` are kept untouched (e.g. records a stricter filter left out).
    Rows whose key differs were made another way: an error unless `overwrite`, then dropped.
    """
    rows = read_jsonl(log_path) if log_path.exists() else []
    current = {t.id: t.key for t in tasks}
    keep, done, stale = [], set(), 0
    for row in rows:
        rid = row.get("id")
        if rid not in current:
            keep.append(row)
        elif row.get("key") != current[rid]:
            stale += 1
        elif row.get("error") is None and rid not in done:
            done.add(rid)
            keep.append(row)
    if stale and not overwrite:
        raise StaleResultsError(
            f"{log_path}: {stale} results were made with another prompt, model, settings or record text; "
            "pass --overwrite to redo them or choose another output"
        )
    if stale:
        log.warning("%s: %d results were made another way; redoing them", log_path, stale)
    if len(keep) != len(rows):
        write_jsonl(log_path, keep)
    return [t for t in tasks if t.id not in done]


class Progress:
    """A tqdm bar, the run's counts, and `progress_path` (progress.json, which the app polls) if given."""

    def __init__(
        self, stage: str, log_path: Path, total: int, done_before: int, enabled: bool, progress_path: Path | None
    ) -> None:  # fmt: skip
        self.stage, self.log_path, self.total = stage, log_path, total
        self.before, self.ok, self.failed = done_before, 0, 0
        self.started = time.monotonic()
        self.bar = tqdm(total=total, initial=done_before, desc=stage, unit="rec", disable=not enabled, dynamic_ncols=True)
        self.file = ProgressFile(progress_path, stage, total, done_before) if progress_path is not None else None

    def update(self, ok: bool) -> None:
        self.ok += ok
        self.failed += not ok
        self.bar.update()
        if self.file is not None:
            self.file.update(self.before + self.ok + self.failed)  # per record, rate-limited

    def close(self) -> dict:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        return {
            "stage": self.stage, "total": self.total, "done": self.before + self.ok, "failed": self.failed,
            "skipped": self.before, "new": self.ok, "seconds": round(time.monotonic() - self.started, 3),
            "log": str(self.log_path),
        }  # fmt: skip


def run_job(
    job: Job, tasks: Sequence[Task], backend: Backend, log_path: Path, max_new_tokens: int,
    *, overwrite: bool = False, progress: bool = True, progress_path: Path | None = None,
) -> dict:  # fmt: skip
    """Ask the backend for every task not yet done; append each row as it finishes; summary dict.

    Holds the lock of the log's folder (`threeds.io.lock`): two jobs appending to one log would each
    ask for every record.
    """
    log_path = Path(log_path)
    with locked(log_path.parent):
        todo = resume(log_path, tasks, overwrite)
        bar = Progress(job.stage, log_path, len(tasks), len(tasks) - len(todo), progress, progress_path)
        spent: dict[str, tuple[float, int]] = {}  # seconds and attempts of earlier rounds, per id
        try:
            for round_ in range(job.reasks + 1):
                if not todo:
                    break
                prompts = [t.prompt if round_ == 0 else job.reask(t.prompt) for t in todo]
                final = round_ == job.reasks
                todo = _ask_round(job, todo, prompts, backend, log_path, max_new_tokens, bar, spent, final)
        finally:
            summary = bar.close()
    return summary


def _ask_round(
    job: Job, tasks: list[Task], prompts: list[str], backend: Backend, log_path: Path, max_new_tokens: int,
    bar: Progress, spent: dict[str, tuple[float, int]], final: bool,
) -> list[Task]:  # fmt: skip
    """One pass over `tasks`; returns those whose reply came back unusable, to ask again."""
    retry: list[Task] = []

    def on_reply(i: int, reply: Reply) -> None:
        task = tasks[i]
        seconds, attempts = spent.get(task.id, (0.0, 0))
        seconds, attempts = seconds + reply.seconds, attempts + reply.attempts
        fields = job.to_fields(reply)
        if reply.error is None and fields["error"] is not None and not final:
            spent[task.id] = (seconds, attempts)
            retry.append(task)
            return
        row = {"id": task.id, **fields, "backend": backend.name, "model": reply.model or backend.label,
               "seconds": round(seconds, 4), "attempts": attempts, "key": task.key}  # fmt: skip
        append_jsonl(log_path, [row])
        bar.update(ok=row["error"] is None)

    backend.chat(prompts, max_new_tokens, on_reply)
    return retry


def good_rows(log_path: Path, tasks: Sequence[Task]) -> dict[str, dict]:
    """id -> the successful, current row of each task that has one."""
    keys = {t.id: t.key for t in tasks}
    rows = read_jsonl(log_path) if Path(log_path).exists() else []
    return {r["id"]: r for r in rows if r.get("error") is None and keys.get(r.get("id")) == r.get("key")}
