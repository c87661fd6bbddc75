"""The arms of an experiment: `NAME=SPEC` parsed, and the training ids each one stands for.

An arm is a training set drawn from one run. SPEC:

- `current`: the run's selection (selection.json, in pick order);
- `preset:NAME`: a saved selection (`RUN/selections/NAME.json`) applied to the run;
- `random:N` / `random:same`: N records (or as many as the first arm) drawn with the seed from
  every record of the run's input: the paper's random baseline. Each seed draws its own subset, so
  the spread over seeds includes the luck of the draw;
- `quality`: every record rated at least the run's quality threshold (Stage 1 only);
- `all`: every record of the run's input;
- `base`: no training (the model as it is).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from threeds.config import FilterConfig, ModelConfig
from threeds.errors import SettingsError, ThreedsError
from threeds.rundir import layout
from threeds.rundir.check import load_scored, stage_part
from threeds.rundir.read import Run, load_run, selected_ids
from threeds.selection.apply import (
    apply,
    load_preset,
    quality_per_row,
    read_run_flags,
    read_run_ratings,
)
from threeds.selection.quality import quality_mask

ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KINDS = ("current", "preset", "random", "quality", "all", "base")


class ArmError(ThreedsError, ValueError):
    """An arm that cannot be built from the run: one line naming the arm and what is missing."""


@dataclass(frozen=True)
class Arm:
    name: str
    spec: str  # as given: "random:same"
    kind: str  # one of KINDS
    arg: str | None = None  # preset name, "same" or a count

    @property
    def trains(self) -> bool:
        return self.kind != "base"


def parse_arm(text: str) -> Arm:
    """`NAME=SPEC` as an Arm; SettingsError (a usage error) naming what is wrong."""
    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not ARM_NAME.fullmatch(name):
        raise SettingsError(f"--arm {text!r}: expected NAME=SPEC, NAME of letters, digits, '.', '_' and '-'")
    kind, _, arg = spec.partition(":")
    if kind not in KINDS or (kind in ("preset", "random")) != bool(arg):
        raise SettingsError(f"--arm {text!r}: SPEC must be current, preset:NAME, random:same, random:N, quality, all or base")
    if kind == "random" and arg != "same" and not (arg.isdigit() and int(arg) > 0):
        raise SettingsError(f"--arm {text!r}: random:N needs a whole number N >= 1, or random:same")
    return Arm(name, spec, kind, arg or None)


def parse_arms(texts: tuple[str, ...] | list[str], baseline: str | None = None) -> list[Arm]:
    """Every arm, names unique, `random:same` not first, the baseline among them."""
    arms = [parse_arm(t) for t in texts]
    if len(arms) < 1:
        raise SettingsError("give at least one --arm NAME=SPEC (two to compare)")
    names = [a.name for a in arms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SettingsError(f"--arm: the name {twice[0]!r} is given twice")
    if arms[0].arg == "same":
        raise SettingsError(f"--arm {arms[0].name}: random:same takes the size of the first arm, so it cannot be first")
    if baseline is not None and baseline not in names:
        raise SettingsError(f"--baseline {baseline!r}: not an arm (arms: {', '.join(names)})")
    return arms


class ArmSource:
    """The run an experiment draws its arms from, loaded once."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run: Run = load_run(self.run_dir)
        self.records = self.run.input_records  # id -> record, input order
        if not self.records:
            raise ArmError(f"{self.run_dir}: no records (data.jsonl or the input named in manifest.json) to train on")

    def ids(self, arm: Arm, seed: int, same: int | None = None) -> list[str] | None:
        """The arm's training ids for this seed (None: no training); `same` = the first arm's size."""
        if arm.kind == "base":
            return None
        if arm.kind == "random":
            n = same if arm.arg == "same" else int(arm.arg)
            return self._random(arm, n, seed)
        found = {"current": self._current, "preset": self._preset, "quality": self._quality, "all": self._all}[arm.kind](arm)
        if not found:
            raise ArmError(f"arm {arm.name} ({arm.spec}): no record to train on")
        return found

    def records_of(self, ids: list[str]) -> list[dict]:
        missing = [i for i in ids if i not in self.records]
        if missing:
            raise ArmError(f"{len(missing)} training ids are not records of the run {self.run_dir}, e.g. {missing[0]!r}")
        return [self.records[i] for i in ids]

    def _current(self, arm: Arm) -> list[str]:
        if self.run.selection is None:
            problem = self.run.errors.get(layout.SELECTION, "no selection.json: run `threeds select` first")
            raise ArmError(f"arm {arm.name} (current): {problem}", path=None if layout.SELECTION in problem else self.run_dir)
        return selected_ids(self.run.selection)

    def _preset(self, arm: Arm) -> list[str]:
        config = load_preset(self.run_dir, arm.arg)
        metrics, embeddings = load_scored(self.run_dir)
        ratings, flags = read_run_ratings(self.run_dir, config), read_run_flags(self.run_dir, config, metrics)
        return apply(config, metrics, embeddings, ratings, flags, run_dir=self.run_dir).picked_ids

    def _quality(self, arm: Arm) -> list[str]:
        if self.run.ratings is None:
            raise ArmError(f"arm {arm.name} (quality): the run has no ratings.jsonl (Stage 1)", path=self.run_dir)
        ids = list(self.records)
        scores = quality_per_row(self.run.ratings, ids)
        keep = quality_mask(np.asarray(scores, dtype=float), self.threshold)
        return [i for i, k in zip(ids, keep, strict=True) if k]

    def _all(self, arm: Arm) -> list[str]:
        return list(self.records)

    def _random(self, arm: Arm, n: int | None, seed: int) -> list[str]:
        pool = list(self.records)
        if n is None or n > len(pool):
            raise ArmError(f"arm {arm.name} ({arm.spec}): {n} records asked, the run has {len(pool)}")
        return random.Random(seed).sample(pool, n)

    @property
    def threshold(self) -> float:
        """The run's quality threshold (its filter stage's; FilterConfig's default, the paper's, when not recorded)."""
        value = stage_part(self.run.manifest, "filter", "config").get("quality_threshold")
        return float(value) if isinstance(value, (int, float)) else FilterConfig().quality_threshold

    def model(self) -> ModelConfig:
        """The run's target model as its score stage recorded it: model (None = embedded), template, system."""
        config = stage_part(self.run.manifest, "score", "config")
        return ModelConfig(**{key: config.get(key) for key in ("model", "template", "system")})
