"""Seconds per trained arm of `threeds experiment`, two code trees interleaved (BENCHMARKS.md (l)).

Issue 29: the runner used to load the base model again to evaluate an arm it had just trained and
merge the adapter it had just saved; it now evaluates the model it trained. Each round copies the
run to a fresh folder and runs the same small experiment with each tree (`PYTHONPATH=TREE python -m
threeds experiment ...` from a folder outside both trees, sharing this checkout's cache/models: this
interpreter and its packages, only the code differs), alternating which tree goes first. Prints per tree the seconds of every trained arm (train_s + eval_s from units.json:
model load, training, evaluation), the command's wall time, and whether every arm's items.jsonl
log-probabilities and accuracy are equal across the trees.

    python bench/experiment_arm.py --before /work/before --after . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("a=random:4", "b=random:8")  # 1 and 2 optimizer steps of 4 records


def experiment(tree: Path, run: Path, cwd: Path, args: argparse.Namespace) -> tuple[float, dict, dict]:
    """Run the experiment with `tree`'s code: (wall seconds, units.json, arm -> [(logprobs, correct) per item])."""
    argv = [sys.executable, "-m", "threeds", "experiment", "--run", str(run), "--name", "bench", "--bench", args.bench,
            "--limit", str(args.limit), "--batch-size", "4", "--grad-accum", "1", "--cutoff", "256", "--dtype", "float32",
            *[a for arm in ARMS for a in ("--arm", arm)]]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    where = subprocess.run([sys.executable, "-c", "import threeds; print(threeds.__file__)"], env=env, cwd=cwd,
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    if not Path(where).is_relative_to(tree.resolve()):
        raise SystemExit(f"PYTHONPATH={tree} imports threeds from {where}")
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    exp = run / "experiments" / "bench"
    units = json.loads((exp / "units.json").read_text())
    items = {}
    for arm in (a.split("=")[0] for a in ARMS):
        rows = [json.loads(line) for line in (exp / "evals" / arm / "seed0" / "items.jsonl").read_text().splitlines()]
        items[arm] = [(r["logprobs"], r["correct"]) for r in rows]
    return wall, units, items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the old code's tree (e.g. /work/before)")
    parser.add_argument("--after", type=Path, default=ROOT, help="the new code's tree (default: this one)")
    parser.add_argument("--run", type=Path, default=ROOT / "cache" / "demo", help="run directory the arms are drawn from")
    parser.add_argument("--bench", default="mmlu-medical")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = {"before": args.before, "after": args.after}
    per_arm: dict[str, list[float]] = {name: [] for name in trees}
    walls: dict[str, list[float]] = {name: [] for name in trees}
    numbers: dict[str, dict] = {}
    load = os.getloadavg()[0]
    cwd = Path(tempfile.mkdtemp())  # not a tree (the current folder comes first on sys.path), the model copy shared
    (cwd / "cache").mkdir()
    (cwd / "cache" / "models").symlink_to(ROOT / "cache" / "models")
    for round_ in range(args.rounds):
        order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
        for name in order:
            with tempfile.TemporaryDirectory() as tmp:
                run = Path(tmp) / "run"
                shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("experiments", "pick_orders", ".lock"))
                wall, units, items = experiment(trees[name], run, cwd, args)
            walls[name].append(wall)
            per_arm[name] += [u["train_s"] + u["eval_s"] for u in units.values()]
            if numbers.setdefault(name, items) != items:
                raise SystemExit(f"{name}: another round gave other numbers")
    print(json.dumps({
        "arms": list(ARMS), "bench": args.bench, "limit": args.limit, "rounds": args.rounds,
        "load_average": [round(load, 1), round(os.getloadavg()[0], 1)],
        **{name: {"seconds_per_arm_mean": round(statistics.mean(v), 2), "seconds_per_arm": [round(x, 2) for x in v],
                  "command_wall_s": [round(w, 1) for w in walls[name]]} for name, v in per_arm.items()},
        "ratio_after_over_before": round(statistics.mean(per_arm["after"]) / statistics.mean(per_arm["before"]), 3),
        "same_numbers": numbers["before"] == numbers["after"],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
