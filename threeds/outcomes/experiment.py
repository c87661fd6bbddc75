"""`threeds experiment`: train every arm x seed on a run's records, evaluate each, compare them.

Layout of `RUN/experiments/NAME/`:

- `experiment.json`: the settings, the model, the arms with their specs and sizes per seed;
- `arms/ARM/seedK/`: the training (`threeds.outcomes.train`: adapter, ids.json, loss.jsonl, ...);
- `evals/ARM/seedK/`: its evaluation (`threeds.outcomes.evaluate`: items.jsonl, summary.json);
- `units.json`: each arm x seed's state and time (train and eval seconds): the page's table;
- `progress.json`, `status.json`, `.lock`: as in a run directory (`threeds.rundir.progress`);
- `summary.json`: the statistics over the arms (`threeds.outcomes.stats.summarize`);
- `report.md`, `report.csv`: the same as a report (`threeds.outcomes.report`).

A `base` arm is evaluated once (seed 0): without training every seed would give the same numbers.
A rerun reuses every finished evaluation and training, and resumes a killed one; arms may be
added to an experiment, but its other settings cannot change (another name does that).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from threeds.config import (
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    check_settings,
)
from threeds.errors import SettingsError, ThreedsError
from threeds.io.data import write_json
from threeds.io.lock import locked
from threeds.model.files import model_label
from threeds.model.load import load_model
from threeds.model.lora import merged
from threeds.outcomes import report
from threeds.outcomes.arms import SIZED, Arm, ArmSource, default_baseline, parse_arms
from threeds.outcomes.benchsets import Bench, load_bench
from threeds.outcomes.evaluate import answer_key, check_shots, evaluate
from threeds.outcomes.files import read_described, read_units
from threeds.outcomes.results import arm_items, experiment_dir
from threeds.outcomes.train import Trained, finished, step_plan, train_arm
from threeds.rundir import layout
from threeds.rundir.check import read_json_object
from threeds.rundir.progress import ProgressFile
from threeds.rundir.write import package_versions
from threeds.selection.apply import config_to_json, load_preset

log = logging.getLogger(__name__)

FIXED = ("bench", "limit", "shots", "prompt_format", "model", "train")  # what every arm of an experiment shares
BEFORE = {"prompt_format": "chat"}  # a setting an older experiment.json lacks: the value it ran with


class ExperimentError(ThreedsError, ValueError):
    """An experiment that cannot run as asked: one line naming the experiment and the setting."""


@dataclass(frozen=True)
class Unit:
    """One arm x seed: its training ids (None: the base model) and its two folders."""

    arm: Arm
    seed: int
    ids: list[str] | None

    @property
    def key(self) -> str:
        return f"{self.arm.name}/seed{self.seed}"


def plan_units(source: ArmSource, arms: list[Arm], seeds: int) -> list[Unit]:
    """Every arm x seed with its ids; random:same and random:length follow the first arm of the same seed."""
    units = []
    for seed in range(seeds):
        first = source.ids(arms[0], seed)
        for arm in arms:
            if arm.kind == "base" and seed:
                continue
            if arm.kind == "random" and arm.arg in SIZED and first is None:
                raise SettingsError(f"--arm {arm.name}: {arm.spec} needs a first arm that trains (not base)")
            units.append(Unit(arm, seed, first if arm is arms[0] else source.ids(arm, seed, first)))
    return sorted(units, key=lambda u: (u.seed, arms.index(u.arm)))


def experiment_model(source: ArmSource, config: ExperimentConfig, train: TrainConfig) -> ModelConfig:
    """The run's target model (model, template, system), with --model instead when given, in the
    training's dtype: every arm trains and evaluates in the same precision."""
    run = source.model()
    return dataclasses.replace(run, model=config.model or run.model, dtype=train.dtype)


def describe_experiment(config: ExperimentConfig, train: TrainConfig, arms: list[Arm], units: list[Unit], run_dir: Path,
                        model: ModelConfig) -> dict:  # fmt: skip
    sizes = {arm.name: {f"seed{u.seed}": (None if u.ids is None else len(u.ids)) for u in units if u.arm is arm} for arm in arms}
    return {
        "name": config.name, "run": str(run_dir), "bench": config.bench, "limit": config.limit, "shots": config.shots,
        "prompt_format": config.prompt_format,
        "model": {"model": model.model, "template": model.template, "system": model.system},  # its dtype: train's
        "train": dataclasses.asdict(train), "seeds": config.seeds,
        "baseline": config.baseline or default_baseline(arms),
        "arms": [{"name": a.name, "spec": a.spec, "records": sizes[a.name], **_frozen(run_dir, a)} for a in arms],
        "created": time.time(), "versions": package_versions(),
    }  # fmt: skip


def _frozen(run_dir: Path, arm: Arm) -> dict:
    """A preset arm's selection settings as recorded with the experiment (the app's `current` is one)."""
    return {"selection": config_to_json(load_preset(run_dir, arm.arg))} if arm.kind == "preset" else {}


def check_rerun(exp: Path, new: dict) -> None:
    """An experiment folder holding other settings is refused (arms may be added, not changed)."""
    path = exp / layout.EXPERIMENT
    if not path.is_file():
        return
    old = read_described(path)
    new["created"] = old.get("created", new["created"])  # the experiment's, not this rerun's
    for key in FIXED:
        if old.get(key, BEFORE.get(key)) != new[key]:
            raise ExperimentError(f"{exp}: experiment {new['name']} was made with other {key} "
                                  f"({old.get(key)!r}); give this one another --name", path=None)  # fmt: skip
    before = {a["name"]: a for a in old.get("arms", [])}
    for arm in new["arms"]:
        was = before.get(arm["name"], arm)
        if was["spec"] != arm["spec"]:
            raise ExperimentError(f"{exp}: arm {arm['name']} was {was['spec']}, not {arm['spec']}; name the new arm differently")
        if was.get("selection", arm.get("selection")) != arm.get("selection"):
            raise ExperimentError(f"{exp}: arm {arm['name']} ({arm['spec']}): the preset's settings changed since the "
                                  "experiment started; save them under another preset name and add that arm")  # fmt: skip


def check_trained_ids(exp: Path, units: list[Unit]) -> None:
    """A unit whose training (finished or not) holds other ids than its arm gives now is refused before
    anything runs: its adapter and evaluation would be reported under the new ids (the run's
    selection or a preset changed since)."""
    for unit in units:
        path = layout.unit_dir(exp, "train", unit.arm.name, unit.seed) / layout.IDS
        if unit.ids is None or not path.is_file():
            continue
        trained = read_json_object(path).get("ids")
        if trained != unit.ids:
            count = len(trained) if isinstance(trained, list) else "?"
            raise ExperimentError(f"{exp}: arm {unit.arm.name} ({unit.arm.spec}) seed {unit.seed} was trained on {count} "
                                  f"records that differ from the {len(unit.ids)} it stands for now (the run's selection "
                                  "or preset changed since): give the new one another --name; this one stays as it was")  # fmt: skip


# ------------------------------------------------------------------------------ running


Log = Callable[[str], None]


class Runner:
    """Runs the units of one experiment in order, recording state and time in units.json."""

    def __init__(self, exp: Path, config: ExperimentConfig, train: TrainConfig, source: ArmSource, units: list[Unit],
                 bench: Bench, say: Log) -> None:  # fmt: skip
        self.exp, self.config, self.train, self.source, self.units, self.bench, self.say = exp, config, train, source, units, bench, say
        self.spec = experiment_model(source, config, train)
        self.key = answer_key(bench)  # an evaluation graded with another answer key is made again
        path = exp / layout.UNITS
        self.state: dict[str, dict] = read_units(path) if path.is_file() else {}

    def run(self) -> None:
        for unit in self.units:  # every unit listed from the start: the page counts the work still to do
            row = self.state.setdefault(unit.key, {"arm": unit.arm.name, "seed": unit.seed})
            row["records"] = None if unit.ids is None else len(unit.ids)
        self.save_state()
        for index, unit in enumerate(self.units):
            row = self.state[unit.key]
            if self.evaluated(unit):
                row.update(train=row.get("train") or ("none" if unit.ids is None else "done"), eval="done")
                trained = read_json_object(self.folder(unit, "train") / layout.TRAIN_SUMMARY) if unit.ids is not None else {}
                row.update({"steps": trained["steps"]} if "steps" in trained else {})
                continue
            self.say(f"[{index + 1}/{len(self.units)}] {unit.key}: " + self.time_left(index))
            trained = None
            if unit.ids is not None:
                trained = self.timed(unit, "train", self.train_unit)
            else:
                row["train"] = "none"
            self.timed(unit, "eval", functools.partial(self.eval_unit, trained=trained))
        self.save_state()

    def timed(self, unit: Unit, phase: str, work: Callable[[Unit], Trained | dict | None]) -> Trained | dict | None:
        """work(unit) with its state and seconds recorded; its result (None: finished before, reused)."""
        row = self.state[unit.key]
        row[phase] = "running"
        self.save_state()
        start = time.perf_counter()
        result = work(unit)
        row[phase] = "done"
        if result is not None:
            row[f"{phase}_s"] = round(time.perf_counter() - start, 2)
            row.update({"steps": result.summary["steps"]} if phase == "train" else {"n_items": result.get("n_items")})
        self.save_state()
        return result

    def time_left(self, index: int) -> str:
        """'about N min left' from the mean time of the units finished in this experiment."""
        spent = [r.get("train_s", 0) + r.get("eval_s", 0) for r in self.state.values() if "eval_s" in r]
        if not spent:
            return "starting"
        left = sum(spent) / len(spent) * (len(self.units) - index)
        return f"about {left / 60:.1f} min left for the experiment"

    def train_unit(self, unit: Unit) -> Trained | None:
        out = self.folder(unit, "train")
        if finished(out) is not None:
            return None
        records = self.source.records_of(unit.ids)
        config = dataclasses.replace(self.train, seed=unit.seed)
        meta = {"model": model_label(self.spec.model), "run": str(self.source.run_dir), "arm": unit.arm.spec}
        steps = len(step_plan(len(records), config))  # the page shows the real count from the start, not 0 / 0
        bar = ProgressFile(self.exp / layout.PROGRESS, f"{unit.key} train", steps, unit="steps")
        trained = train_arm(self.spec, records, config, out, meta, progress=bar)
        bar.close()
        summary = trained.summary
        self.say(f"{unit.key}: trained {summary['records']} records in {summary['steps']} steps, final loss {summary['final_loss']:.3f}")
        return trained

    def eval_unit(self, unit: Unit, trained: Trained | None) -> dict:
        """The unit's evaluation: of the model it just trained when there is one (its adapter merged in
        memory gives the weights a reload would, `threeds.model.lora`), else loaded with its saved adapter."""
        out, adapter = self.folder(unit, "eval"), None if unit.ids is None else str(self.folder(unit, "train"))
        config = EvalConfig(bench=self.config.bench, adapter=adapter, limit=self.config.limit, shots=self.config.shots,
                            prompt_format=self.config.prompt_format, batch_size=self.config.eval_batch_size)  # fmt: skip
        if trained is not None and trained.model is not None:
            model, tokenizer = merged(trained.model), trained.tokenizer
        else:
            model, tokenizer = load_model(self.spec.model, adapter, self.spec.dtype)
        bar = ProgressFile(self.exp / layout.PROGRESS, f"{unit.key} eval", len(self.bench.items), unit="items")
        summary = evaluate(model, tokenizer, self.bench, out, config, self.spec, progress=bar)
        bar.close()
        self.say(f"{unit.key}: accuracy {summary.get('acc', float('nan')):.3f} on {summary.get('n_items', '?')} items")
        return summary

    def evaluated(self, unit: Unit) -> bool:
        """Whether the unit's evaluation finished (its summary is there) against the set's answers as they
        are now: nothing to do. When the answers changed, `evaluate` grades its rows again."""
        path = self.folder(unit, "eval") / layout.EVAL_SUMMARY
        if not path.is_file() or self.state.get(unit.key, {}).get("eval") != "done":
            return False
        return read_json_object(path).get("answer_key") == self.key

    def save_state(self) -> None:
        write_json(self.exp / layout.UNITS, self.state)

    def folder(self, unit: Unit, kind: str) -> Path:
        return layout.unit_dir(self.exp, kind, unit.arm.name, unit.seed)


def run_experiment(run_dir: str | os.PathLike, config: ExperimentConfig, train: TrainConfig, say: Log = log.info) -> dict:
    """Plan, train and evaluate every unit not finished yet, then write summary.json and the report."""
    run_dir = Path(run_dir)
    exp = experiment_dir(run_dir, config.name)
    arms = parse_arms(config.arm, config.baseline)
    for settings in (config, train):  # configs built in code: the CLI checked its flags already
        check_settings(settings)
    bench = load_bench(config.bench, config.limit)  # a bad set, or too few dev items for --shots, fails before any training
    check_shots(bench, config.shots)
    source = ArmSource(run_dir)
    units = plan_units(source, arms, config.seeds)
    with locked(exp):
        described = describe_experiment(config, train, arms, units, run_dir, experiment_model(source, config, train))
        check_rerun(exp, described)
        check_trained_ids(exp, units)
        write_json(exp / layout.EXPERIMENT, described)
        Runner(exp, config, train, source, units, bench, say).run()
        summary = summarize_experiment(exp, bench)
        (exp / layout.PROGRESS).unlink(missing_ok=True)
    return summary


def summarize_experiment(exp: Path, bench: Bench | None = None) -> dict:
    """summary.json from the arms' evaluations (of `bench`'s items when given), and the Markdown + CSV report."""
    from threeds.outcomes.stats import summarize

    described = read_described(exp / layout.EXPERIMENT)
    evals = arm_items(exp, described, None if bench is None else {item.id for item in bench.items})
    if described["baseline"] not in evals:
        raise ExperimentError(f"{exp}: the baseline arm {described['baseline']} has no evaluation yet")
    summary = summarize(evals, described["baseline"])
    write_json(exp / layout.EXPERIMENT_SUMMARY, summary)
    (exp / layout.REPORT_MD).write_text(report.markdown(described, summary), encoding="utf-8")
    (exp / layout.REPORT_CSV).write_text(report.csv_text(summary, described), encoding="utf-8")
    return summary
