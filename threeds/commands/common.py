"""What the commands share: the exceptions that end a command with one line, and the summary print."""

from __future__ import annotations

import json

from threeds.backends import BackendError
from threeds.data import DataError
from threeds.joblog import StaleResultsError
from threeds.rate import PromptError
from threeds.rundir import RunError

# What the stage commands turn into exit status 1 with a one-line message.
EXPECTED_ERRORS = (BackendError, DataError, PromptError, StaleResultsError, RunError, OSError)


def print_summary(summary: dict) -> None:
    """The counts, and where the failures are when there are any."""
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    if summary["failed"]:
        print(f"{summary['failed']} {summary['stage']} failures are in {summary['log']} (rows with an \"error\"); "
              "run the same command again to retry them")  # fmt: skip
