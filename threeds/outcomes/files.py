"""An experiment's files read back with their shapes checked: a hand-edited or corrupt file ends in
one `ExperimentFileError` naming the file and the field (or line), never a KeyError deep in the
statistics or a traceback on the Outcomes page.

Each reader checks what its readers use: experiment.json (the settings and arms), units.json (each
arm x seed's state), summary.json (the statistics), an evaluation's items.jsonl (one row per item,
ids unique: a row twice would count an item twice) and a training's loss.jsonl.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from threeds.errors import ThreedsError
from threeds.io.data import DataError, read_jsonl
from threeds.rundir.check import read_json_object

FIX = "the file was edited or is damaged; delete it (or the experiment) and run the experiment again"


class ExperimentFileError(ThreedsError):
    """An experiment file that does not hold what threeds wrote there."""


def _fail(path: Path, where: str, expected: str, value: Any) -> ExperimentFileError:
    return ExperimentFileError(f"{where}: expected {expected}, got {_kind(value)}; {FIX}", path=path)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(path: Path, where: str, value: Any, expected: str, ok: bool) -> None:
    if not ok:
        raise _fail(path, where, expected, value)


def _read_object(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ThreedsError as exc:
        raise ExperimentFileError(f"{exc}") from None


# ------------------------------------------------------------------------------ experiment.json


def read_described(path: Path) -> dict:
    """experiment.json: name, bench, seeds, baseline, arms [{name, spec, records}], train, model."""
    value = _read_object(path)
    for key, expected, ok in (
        ("name", "text", lambda v: isinstance(v, str)), ("bench", "text", lambda v: isinstance(v, str)),
        ("seeds", "a whole number >= 1", lambda v: _whole(v) and v >= 1),
        ("baseline", "text", lambda v: isinstance(v, str)), ("arms", "a list of arms", lambda v: isinstance(v, list) and v),
        ("train", "an object", lambda v: isinstance(v, dict)), ("model", "an object", lambda v: isinstance(v, dict)),
        ("limit", "a whole number or null", lambda v: v is None or _whole(v)),
        ("shots", "a whole number", lambda v: _whole(v)),
    ):  # fmt: skip
        _check(path, f"field {key}", value.get(key), expected, key in value and ok(value.get(key)))
    for i, arm in enumerate(value["arms"], start=1):
        where = f"field arms, arm {i}"
        _check(path, where, arm, "an object with name and spec", isinstance(arm, dict))
        for key in ("name", "spec"):
            _check(path, f"{where}: {key}", arm.get(key), "text", isinstance(arm.get(key), str))
        records = arm.get("records") or {}
        _check(path, f"{where}: records", records, "an object of seed: count",
               isinstance(records, dict) and all(v is None or _whole(v) for v in records.values()))
    return value


# ------------------------------------------------------------------------------ units.json


UNIT_NUMBERS = ("records", "steps", "train_s", "eval_s", "n_items")


def read_units(path: Path) -> dict:
    """units.json: per ARM/seedK, arm (text), seed, the train and eval states, the counts and times."""
    value = _read_object(path)
    for key, unit in value.items():
        _check(path, f"unit {key}", unit, "an object", isinstance(unit, dict))
        _check(path, f"unit {key}: arm", unit.get("arm"), "text", isinstance(unit.get("arm"), str))
        _check(path, f"unit {key}: seed", unit.get("seed"), "a whole number", _whole(unit.get("seed")))
        for name in ("train", "eval"):
            _check(path, f"unit {key}: {name}", unit.get(name), "a state (text)", unit.get(name) is None or isinstance(unit.get(name), str))
        for name in UNIT_NUMBERS:
            _check(path, f"unit {key}: {name}", unit.get(name), "a number", unit.get(name) is None or _number(unit.get(name)))
    return value


# ------------------------------------------------------------------------------ summary.json


ARM_NUMBERS = ("n_items", "acc", "acc_norm", "gold_prob", "delta", "mcnemar_p", "p_holm", "disagreement", "mde_80")


def read_summary(path: Path) -> dict:
    """summary.json: baseline, n_items, majority_acc and per arm its statistics (`threeds.outcomes.stats`)."""
    value = _read_object(path)
    _check(path, "field baseline", value.get("baseline"), "text", isinstance(value.get("baseline"), str))
    _check(path, "field n_items", value.get("n_items"), "a whole number", _whole(value.get("n_items")))
    _check(path, "field majority_acc", value.get("majority_acc"), "a number", value.get("majority_acc") is None or _number(value.get("majority_acc")))
    arms = value.get("arms")
    _check(path, "field arms", arms, "an object of arm: statistics", isinstance(arms, dict) and arms)
    subjects = None
    for name, stats in arms.items():
        where = f"field arms, arm {name}"
        _check(path, where, stats, "an object", isinstance(stats, dict))
        for key in ARM_NUMBERS:
            _check(path, f"{where}: {key}", stats.get(key), "a number or null", stats.get(key) is None or _number(stats.get(key)))
        for key in ("acc_ci", "delta_ci"):
            ci = stats.get(key)
            _check(path, f"{where}: {key}", ci, "null or [low, high]", ci is None or isinstance(ci, list) and len(ci) == 2 and all(map(_number, ci)))
        _check(path, f"{where}: verdict", stats.get("verdict"), "text", isinstance(stats.get("verdict", ""), str))
        found = stats.get("subjects", {})
        _check(path, f"{where}: subjects", found, "an object of subject: {n_items, acc}", isinstance(found, dict) and all(
            isinstance(s, dict) and _whole(s.get("n_items")) and _number(s.get("acc")) for s in found.values()))
        _check(path, f"{where}: subjects", sorted(found), f"the subjects of the other arms ({sorted(subjects or [])})",
               subjects is None or set(found) == subjects)
        subjects = set(found)
    return value


# ------------------------------------------------------------------------------ items.jsonl, loss.jsonl


ITEM_FIELDS = (("id", "text", lambda v: isinstance(v, str)), ("gold", "a whole number", _whole),
               ("pred", "a whole number", _whole), ("correct", "true or false", lambda v: isinstance(v, bool)),
               ("correct_norm", "true or false", lambda v: isinstance(v, bool)), ("gold_prob", "a number", _number),
               ("subject", "text", lambda v: isinstance(v, str)), ("prompt", "text", lambda v: isinstance(v, str)),
               ("choices", "a list of texts", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v)),
               ("logprobs", "a list of numbers", lambda v: isinstance(v, list) and all(map(_number, v))))  # fmt: skip


def read_items(path: Path) -> list[dict]:
    """An evaluation's items.jsonl: one row per item, each id once, the fields the statistics and the page read."""
    rows = _rows(path)
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=1):
        _check(path, f"line {line}", row, "an item row (object)", isinstance(row, dict))
        for key, expected, ok in ITEM_FIELDS:
            _check(path, f"line {line}: field {key}", row.get(key), expected, ok(row.get(key)))
        _check(path, f"line {line}: field logprobs", row["logprobs"], f"one number per choice ({len(row['choices'])})",
               len(row["logprobs"]) == len(row["choices"]) >= 2 and 0 <= row["gold"] < len(row["choices"]))
        if row["id"] in seen:
            raise ExperimentFileError(f"line {line}: item {row['id']!r} again (first on line {seen[row['id']]}): it would "
                                      f"count twice; {FIX}", path=path)  # fmt: skip
        seen[row["id"]] = line
    return rows


def read_losses(path: Path) -> list[dict]:
    """A training's loss.jsonl: step (whole number) and loss (a number, or null) per row."""
    rows = _rows(path)
    for line, row in enumerate(rows, start=1):
        _check(path, f"line {line}", row, "an object with step and loss", isinstance(row, dict))
        _check(path, f"line {line}: field step", row.get("step"), "a whole number", _whole(row.get("step")))
        _check(path, f"line {line}: field loss", row.get("loss"), "a number", row.get("loss") is None or _number(row.get("loss")))
    return rows


def _rows(path: Path) -> list:
    try:
        return read_jsonl(path)
    except DataError as exc:
        raise ExperimentFileError(f"{exc}") from None
