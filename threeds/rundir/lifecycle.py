"""One run's life in its directory, the same for `threeds run` and `threeds experiment`: take the
directory's lock, record `running`, do the work, and record how it ended before the lock is let go.

Writing the end inside the lock means no other writer (a Resume, the Stop button recording a run it
had to kill, `threeds.rundir.jobs`) can find the lock free while status.json still says `running`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from threeds.errors import INTERRUPTED, describe
from threeds.io.lock import locked
from threeds.rundir.progress import read_status, write_status


@dataclass
class Ending:
    """How the work ended when it returned: `done` with exit code 0 unless the body says otherwise
    (`done_with_failures`, an empty selection's exit code 3); an exception decides it instead."""

    state: str = "done"
    exit_code: int = 0
    error: str | None = None
    failures: dict = field(default_factory=dict)


@contextmanager
def run_lifecycle(directory: str | os.PathLike) -> Iterator[Ending]:
    """Hold the directory's lock, status `running`; at the end `stopped` (Ctrl-C, the Stop button's
    SIGINT), `failed` (the error's one line and exit code; a run done with failures stays so, with a
    `retry_error`) or the body's `Ending`, all under the lock."""
    directory = Path(directory)
    with locked(directory):
        before = read_status(directory) or {}
        write_status(directory, "running")
        ending = Ending()
        try:
            yield ending
        except BaseException as exc:
            message, code = describe(exc)
            if code != INTERRUPTED and before.get("state") == "done_with_failures":
                # a retry of the failed records that stops on an error (the preflight refuses again, the
                # server is down) has fixed nothing: still done with failures, saying why the retry stopped
                write_status(directory, "done_with_failures", exit_code=before.get("exit_code"), error=before.get("error"),
                             failures=before.get("failures"), retry_error=message)  # fmt: skip
            else:
                write_status(directory, "stopped" if code == INTERRUPTED else "failed", exit_code=code, error=message)
            raise
        write_status(directory, ending.state, exit_code=ending.exit_code, error=ending.error, failures=ending.failures or None)
