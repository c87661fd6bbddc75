"""The arms of an experiment: `NAME=SPEC` parsed, and the training ids each one stands for.

An arm is a training set drawn from one run. SPEC:

- `current`: the run's selection as `threeds select` last wrote it (selection.json, in pick
  order), not a selection tuned in the app: the app's Outcomes page saves its sidebar's selection
  as a preset at Start and trains `preset:` on that instead;
- `preset:NAME`: a saved selection (`RUN/selections/NAME.json`) applied to the run; the experiment
  records the preset's settings (`experiment.json`), so a preset changed later is noticed;
- `random:N` / `random:same`: N records (or as many as the first arm) drawn with the seed from
  every record of the run's input: the paper's random baseline. Each seed draws its own subset, so
  the spread over seeds includes the luck of the draw;
- `random:length`: as many records as the first arm, drawn at random within length strata so that
  their response lengths (tokens of `output`, the run's tokenizer) follow the first arm's: a
  selection that merely prefers long answers is no better than this arm (`length_matched`);
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
SIZED = ("same", "length")  # random arms sized (and for `length`, shaped) after the first arm
LENGTH_BINS = 10


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
        raise SettingsError(f"--arm {text!r}: SPEC must be current, preset:NAME, random:same, random:length, random:N, "
                            "quality, all or base")
    if kind == "random" and arg not in SIZED and not (arg.isdigit() and int(arg) > 0):
        raise SettingsError(f"--arm {text!r}: random:N needs a whole number N >= 1, or random:same or random:length")
    return Arm(name, spec, kind, arg or None)


def default_baseline(arms: list[Arm]) -> str:
    """The arm the others are compared with when none is named: the first random arm (the paper's
    baseline: "does the selection beat random?"), else the first arm."""
    return next((a.name for a in arms if a.kind == "random"), arms[0].name)


def parse_arms(texts: tuple[str, ...] | list[str], baseline: str | None = None) -> list[Arm]:
    """Every arm, names unique, `random:same` not first, the baseline among them."""
    arms = [parse_arm(t) for t in texts]
    if len(arms) < 1:
        raise SettingsError("give at least one --arm NAME=SPEC (two to compare)")
    names = [a.name for a in arms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SettingsError(f"--arm: the name {twice[0]!r} is given twice")
    if arms[0].kind == "random" and arms[0].arg in SIZED:
        raise SettingsError(f"--arm {arms[0].name}: {arms[0].spec} follows the first arm, so it cannot be first")
    if baseline is not None and baseline not in names:
        raise SettingsError(f"--baseline {baseline!r}: not an arm (arms: {', '.join(names)})")
    return arms


class ArmSource:
    """The run an experiment draws its arms from, loaded once."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run: Run = load_run(self.run_dir)
        self.records = self.run.input_records  # id -> record, input order
        self._lengths: np.ndarray | None = None  # response_lengths(), once a random:length arm asks
        self._index: dict[str, int] = {}
        if not self.records:
            raise ArmError(f"{self.run_dir}: no records (data.jsonl or the input named in manifest.json) to train on")

    def ids(self, arm: Arm, seed: int, first: list[str] | None = None) -> list[str] | None:
        """The arm's training ids for this seed (None: no training); `first`: the first arm's ids."""
        if arm.kind == "base":
            return None
        if arm.kind == "random" and arm.arg == "length":
            return self._length_matched(arm, first, seed)
        if arm.kind == "random":
            n = (None if first is None else len(first)) if arm.arg == "same" else int(arm.arg)
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

    def _length_matched(self, arm: Arm, first: list[str] | None, seed: int) -> list[str]:
        if not first:
            raise ArmError(f"arm {arm.name} ({arm.spec}): the first arm has no training records to match")
        lengths = self.response_lengths()
        missing = [i for i in first if i not in self._index]
        if missing:
            raise ArmError(f"arm {arm.name} ({arm.spec}): {len(missing)} ids of the first arm are not records of the run, "
                           f"e.g. {missing[0]!r}")  # fmt: skip
        return length_matched(list(self.records), lengths, [lengths[self._index[i]] for i in first], seed)

    def response_lengths(self) -> np.ndarray:
        """Tokens of every record's response (`output`), in record order, by the run's tokenizer; computed once."""
        if self._lengths is None:
            from threeds.model.load import load_tokenizer

            tokenizer = load_tokenizer(self.model().model)
            texts = [str(r.get("output", "")) for r in self.records.values()]
            self._lengths = np.array([len(ids) for start in range(0, len(texts), 4096) for ids in
                                      tokenizer(texts[start:start + 4096], add_special_tokens=False)["input_ids"]],
                                     dtype=np.int32)  # fmt: skip
            self._index = {sample_id: i for i, sample_id in enumerate(self.records)}
        return self._lengths

    @property
    def threshold(self) -> float:
        """The run's quality threshold (its filter stage's; FilterConfig's default, the paper's, when not recorded)."""
        value = stage_part(self.run.manifest, "filter", "config").get("quality_threshold")
        return float(value) if isinstance(value, (int, float)) else FilterConfig().quality_threshold

    def model(self) -> ModelConfig:
        """The run's target model as its score stage recorded it: model (None = embedded), template, system."""
        config = stage_part(self.run.manifest, "score", "config")
        return ModelConfig(**{key: config.get(key) for key in ("model", "template", "system")})


def length_matched(pool: list[str], lengths: np.ndarray, target: list[int], seed: int, bins: int = LENGTH_BINS) -> list[str]:
    """len(target) ids of `pool` drawn at random (seeded) so that their lengths follow `target`'s:
    the target's lengths cut into `bins` strata at their quantiles, the outer strata closed at the
    target's shortest and longest; each stratum gets as many pool records as the target has in it,
    drawn uniformly among the pool's records of that length range (a stratum short of records
    takes them all and the rest comes from the nearest strata)."""
    target_arr = np.asarray(target)
    edges = np.unique(np.quantile(target_arr, np.linspace(0, 1, min(bins, len(target)) + 1)))
    inner = edges[1:-1]
    want = np.bincount(np.searchsorted(inner, target_arr, side="right"), minlength=len(inner) + 1)
    inside = (lengths >= edges[0]) & (lengths <= edges[-1])
    stratum = np.searchsorted(inner, lengths, side="right")
    rng = random.Random(seed)
    members = [[pool[i] for i in np.flatnonzero(inside & (stratum == k))] for k in range(len(want))]
    for group in members:
        rng.shuffle(group)
    picked: list[str] = []
    deficit = []
    for k, n in enumerate(want):
        picked += members[k][:n]
        deficit.append(n - len(members[k][:n]))
        members[k] = members[k][n:]
    for k, missing in enumerate(deficit):
        for j in sorted(range(len(want)), key=lambda j: abs(j - k)):
            take = members[j][:missing]
            members[j] = members[j][len(take):]
            picked += take
            missing -= len(take)
        deficit[k] = missing
    short = sum(deficit)
    if short:
        raise ArmError(f"random:length: the run has {len(picked)} records within the first arm's length range, "
                       f"{len(target)} needed")  # fmt: skip
    return picked
