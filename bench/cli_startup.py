"""Wall time of light `threeds` commands, for one or more source trees, in one run (issue 25 item 7).

Each command runs in a fresh process `--repeat` times, the trees alternating, so a shared machine's
load falls on all of them alike; the median is reported. `select` works on a copy of --run (it
writes selection.json and pick_orders/ there).

    git worktree add /tmp/before <commit>   # or: git archive <commit> | tar -x -C /tmp/before
    python bench/cli_startup.py --tree before=/tmp/before --tree after=. --run cache/demo
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def commands(run: Path, out: Path) -> dict[str, list[str]]:
    return {
        "threeds --help": ["--help"],
        "threeds select --help": ["select", "--help"],
        "threeds select --run DEMO --out SEL": ["select", "--run", str(run), "--out", str(out)],
    }


def timed(tree: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    started = time.perf_counter()  # cwd: the tree, as `-m` puts the working directory first on the path
    subprocess.run([sys.executable, "-m", "threeds", *args], env=env, cwd=tree, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a threeds source tree")
    parser.add_argument("--run", type=Path, default=Path("cache/demo"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.tree)
    with tempfile.TemporaryDirectory() as tmp:
        times: dict[tuple[str, str], list[float]] = {}
        for name, argv in commands((Path(tmp) / "run").resolve(), (Path(tmp) / "sel.json").resolve()).items():
            for _ in range(args.repeat):
                for tree, path in trees.items():
                    shutil.rmtree(Path(tmp) / "run", ignore_errors=True)
                    shutil.copytree(args.run, Path(tmp) / "run")
                    times.setdefault((name, tree), []).append(timed(Path(path), argv))
    print(f"load average {os.getloadavg()[0]:.1f}; median of {args.repeat} (s)\n")
    print("| command | " + " | ".join(trees) + " |")
    print("|---" * (len(trees) + 1) + "|")
    for name in commands(Path(), Path()):
        print(f"| `{name}` | " + " | ".join(f"{statistics.median(times[(name, t)]):.2f}" for t in trees) + " |")


if __name__ == "__main__":
    main()
