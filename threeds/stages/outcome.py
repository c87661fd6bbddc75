"""How a finished `threeds run` ended, said once for status.json, the command line and the Runs page.

`done` only when every record of every stage went through: records that failed (a rating without
a score, an A' that could not be written) make it `done_with_failures`, exit status 3, with the
counts per stage and the first failed records; an empty selection is `done` with exit status 3 and
the step that emptied it (issue 25: a run never says "done" when records failed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from threeds.config import SelectConfig
from threeds.errors import OK, RECORDS_FAILED
from threeds.selection.apply import empty_reason

RECORD_STAGES = ("rate", "generate")  # the stages that ask the model once per record


@dataclass(frozen=True)
class Outcome:
    state: str  # a status.json state: done or done_with_failures
    exit_code: int
    line: str  # what the command line prints last and status.json keeps as its `error`
    failures: dict = field(default_factory=dict)  # stage -> {failed, total, log, first}


def run_outcome(result: dict, select: SelectConfig) -> Outcome:
    """The end state of a run whose stages all finished, from `run_pipeline`'s result."""
    failures = {stage: stage_failures(result[stage]) for stage in RECORD_STAGES if result[stage]["failed"]}
    selected = f"{result['selected']:,} samples selected"
    if failures:
        first = next(iter(failures.values()))["first"]
        example = f" (the first, {first[0]['id']}: {first[0]['error']})" if first else ""
        logs = " and ".join(f["log"] for f in failures.values())
        return Outcome(
            "done_with_failures", RECORDS_FAILED,
            f"done with failures: {failure_counts(failures)}{example}; {selected}; the failed records are the rows "
            f"with an \"error\" in {logs}: run the same command again to retry them", failures,
        )  # fmt: skip
    if not result["selected"]:
        funnel = result["select"].get("funnel")  # absent in a selection.json older than the funnel
        return Outcome("done", RECORDS_FAILED, f"done, but {selected}: {empty_reason(select, funnel) if funnel else 'widen the bands'}")
    return Outcome("done", OK, f"done: {selected} into {result['out']}")


def stage_failures(summary: dict) -> dict:
    """A record stage's failures as status.json keeps them (the log by its absolute path, for the app)."""
    return {"failed": summary["failed"], "total": summary["total"], "log": str(Path(summary["log"]).absolute()),
            "first": summary.get("first_failures", [])}  # fmt: skip


def failure_counts(failures: dict) -> str:
    """'9 of 10 ratings failed; A' failed for 1 of 1 records'."""
    words = {"rate": "{failed:,} of {total:,} ratings failed", "generate": "A' failed for {failed:,} of {total:,} records"}
    return "; ".join(words.get(stage, stage + ": {failed:,} of {total:,} records failed").format(**f) for stage, f in failures.items())
