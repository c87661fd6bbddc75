"""How far an experiment is and how long it has left, from its own files (units.json, progress.json,
experiment.json), for the Outcomes page while it runs.

Work is counted in its two units, optimizer steps and evaluated items, each at its own pace: seconds
per step and per item from the units finished in this experiment, else from the running unit's
progress since its stage began (an evaluation's items weighted by their tokens). So a time left is
there from the first step on; work whose pace is not measured yet (the evaluations, while the first
arm trains) is named instead of guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from threeds.rundir.progress import seconds_per_unit, units_left


@dataclass(frozen=True)
class TimeLeft:
    """Seconds left for the work whose pace is known, and the kinds of work not measured yet."""

    seconds: float
    unmeasured: tuple[str, ...]


def planned_steps(described: dict, records: int | None) -> int:
    """Optimizer steps of a unit's training: epochs x ceil(records / (batch x accumulation)), as
    `threeds.outcomes.train.step_plan` cuts them; 0 for the base model (no training)."""
    if not records:
        return 0
    train = described.get("train") or {}
    per_step = int(train.get("batch_size", 1)) * int(train.get("grad_accum", 1))
    return int(train.get("epochs", 1)) * math.ceil(records / max(per_step, 1))


def running_unit(progress: dict) -> tuple[str, str] | None:
    """(unit key, 'train' or 'eval') of progress.json's stage ("sel/seed0 train"), None otherwise."""
    key, _, phase = str(progress.get("stage", "")).rpartition(" ")
    return (key, phase) if key and phase in ("train", "eval") else None


def time_left(described: dict, units: dict, progress: dict) -> TimeLeft | None:
    """The experiment's time left as of progress.json's last update; None before any pace is known."""
    items = _items(units, progress)
    paces = {"train": _pace(units, "train", "steps"), "eval": _pace(units, "eval", "n_items")}
    now = running_unit(progress)
    if now is not None and paces[now[1]] is None:
        paces[now[1]] = seconds_per_unit(progress)
    left = {"train": 0.0, "eval": 0.0}
    for key, unit in units.items():
        for phase, work in (("train", planned_steps(described, unit.get("records"))), ("eval", items)):
            if unit.get(phase) in ("done", "none") or (phase == "train" and not work):
                continue
            if now == (key, phase):
                work = units_left(progress)  # an evaluation's items weighted by their tokens
            pace = paces[phase]
            left[phase] += math.nan if pace is None or work is None else work * pace
    known = [v for v in left.values() if not math.isnan(v)]
    unmeasured = tuple(phase for phase, v in left.items() if math.isnan(v))
    if not known and unmeasured:
        return None
    return TimeLeft(sum(known), unmeasured)


def _pace(units: dict, phase: str, count: str) -> float | None:
    """Seconds per step (per item) over the units that finished this phase in this experiment."""
    seconds = work = 0.0
    for unit in units.values():
        if unit.get(f"{phase}_s") and unit.get(count):
            seconds, work = seconds + float(unit[f"{phase}_s"]), work + float(unit[count])
    return seconds / work if work else None


def _items(units: dict, progress: dict) -> int | None:
    """Items per evaluation: a finished one's count, or the running one's total; None before either."""
    for unit in units.values():
        if unit.get("n_items"):
            return int(unit["n_items"])
    now = running_unit(progress)
    return int(progress["total"]) if now is not None and now[1] == "eval" and progress.get("total") else None
