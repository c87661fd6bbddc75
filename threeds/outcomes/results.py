"""An experiment's folder read back, without torch: the Outcomes page lists the experiments of a run
and shows one's files as they are written (`threeds.outcomes.experiment` writes them; importing it
would load torch and transformers, seconds before the page's first paint)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from threeds.errors import SettingsError
from threeds.outcomes.arms import ARM_NAME
from threeds.outcomes.files import read_described, read_items, read_losses, read_summary, read_units
from threeds.rundir import layout


def experiment_dir(run_dir: str | os.PathLike, name: str) -> Path:
    if not ARM_NAME.fullmatch(name or ""):
        raise SettingsError(f"--name {name!r}: letters, digits, '.', '_' and '-' only (up to 64)")
    return Path(run_dir) / layout.EXPERIMENTS / name


def list_experiments(run_dir: str | os.PathLike) -> list[str]:
    """Experiments of a run, newest first (a folder started in the background counts before it plans)."""
    folder = Path(run_dir) / layout.EXPERIMENTS
    found = [p for p in folder.iterdir() if (p / layout.EXPERIMENT).is_file() or (p / layout.JOB).is_file()] if folder.is_dir() else []
    return [p.name for p in sorted(found, key=lambda p: (-p.stat().st_mtime, p.name))]


def arm_items(exp: Path, described: dict, ids: set[str] | None = None) -> dict[str, list[list[dict]]]:
    """items.jsonl rows of every finished evaluation (its summary.json written), one list per seed (the
    stats' input); only the rows of `ids` when given (an evaluation keeps rows of items the set no longer has)."""
    found: dict[str, list[list[dict]]] = {}
    for arm in described["arms"]:
        for seed in range(described["seeds"]):
            folder = layout.unit_dir(exp, "eval", arm["name"], seed)
            if (folder / layout.EVAL_SUMMARY).is_file():
                rows = read_items(folder / layout.ITEMS)
                found.setdefault(arm["name"], []).append(rows if ids is None else [r for r in rows if r["id"] in ids])
    return found


@dataclass(frozen=True)
class Results:
    """An experiment's files as the page shows them (any may be missing while it runs)."""

    described: dict
    summary: dict | None
    units: dict
    evals: dict[str, list[list[dict]]]

    def losses(self, exp: Path) -> list[dict]:
        """Every training's loss per step: arm, seed, step, loss."""
        rows = []
        for arm in self.described.get("arms", []):
            for seed in range(self.described.get("seeds", 1)):
                path = layout.unit_dir(exp, "train", arm["name"], seed) / layout.LOSS
                if path.is_file():
                    rows += [{"arm": arm["name"], "seed": seed, "step": r["step"], "loss": r["loss"]} for r in read_losses(path)]
        return rows


def load_results(exp: str | os.PathLike) -> Results:
    exp = Path(exp)
    described = read_described(exp / layout.EXPERIMENT) if (exp / layout.EXPERIMENT).is_file() else {}
    summary = read_summary(exp / layout.EXPERIMENT_SUMMARY) if (exp / layout.EXPERIMENT_SUMMARY).is_file() else None
    units = read_units(exp / layout.UNITS) if (exp / layout.UNITS).is_file() else {}
    evals = arm_items(exp, described) if described else {}
    return Results(described, summary, units, evals)
