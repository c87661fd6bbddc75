"""What the commands share: the summary print. (Failures end in one line through `threeds.cli.main`,
with the exit status of `threeds.errors`.)"""

from __future__ import annotations

import json


def print_summary(summary: dict) -> None:
    """The counts, and where the failures are when there are any."""
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    if summary["failed"]:
        print(f"{summary['failed']} {summary['stage']} failures are in {summary['log']} (rows with an \"error\"); "
              "run the same command again to retry them")  # fmt: skip
