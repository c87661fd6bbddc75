"""k-center picks in a process of their own: the app's background picks.

At the paper's shape the picks are k-center over ~240k x 4096 band survivors: a minute of CPU
and gigabytes of rows. The app starts this module as a child process (`python -m
threeds.selection.pick_job`) so no slider waits for it and the rows never enter the app server's
memory. The job reads the run's embeddings memory-mapped, gathers the candidates' rows in
chunks, continues the run's stored pick order (`PickOrder`: `threeds select`'s or an earlier
job's order is reused, never recomputed) in steps, and after each step writes `progress.json`
(`threeds.rundir.progress.ProgressFile`: picks done, total, times) for the app's progress bar; the picks (rows of metrics.parquet,
in pick order) go to `--out` when all are made. Exit 0 on success, 1 with one line on stderr
otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from threeds.errors import ThreedsError
from threeds.io.atomic import atomic_write
from threeds.rundir import layout
from threeds.rundir.check import read_embeddings
from threeds.rundir.progress import ProgressFile
from threeds.selection.pick_order import PickOrder

NICE = 10  # CFS then gives the job about a tenth of a core the server wants, and every idle cycle

STEPS = 40  # progress updates over a job's picks
_GATHER_ROWS = 16_384  # candidate rows copied out of the memory map at a time


def gather(embeddings: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The `rows` of a (memory-mapped) array, copied chunk by chunk in its own dtype."""
    out = np.empty((len(rows), embeddings.shape[1]), dtype=embeddings.dtype)
    for start in range(0, len(rows), _GATHER_ROWS):
        out[start : start + _GATHER_ROWS] = embeddings[rows[start : start + _GATHER_ROWS]]
    return out


def make_picks(run_dir: Path, rows: int, candidates: np.ndarray, initial: np.ndarray, seed: int, k: int, progress: Path) -> np.ndarray:
    """Rows of metrics.parquet (`rows` of them) picked by k-center among `candidates`, the first k
    in pick order."""
    k = min(k, len(candidates))
    ProgressFile(progress, "reading the candidates' embeddings", k, unit="picks", ahead=[]).close()
    embeddings = read_embeddings(run_dir / layout.EMBEDDINGS, rows)
    order = PickOrder(gather(embeddings, candidates), seed, initial.tolist(), run_dir)
    report = ProgressFile(progress, "k-center", k, unit="picks", ahead=[], min_interval=0)
    report(0, k)
    step = max(1, -(-k // STEPS))
    picks = np.empty(0, dtype=np.int64)
    for target in [*range(max(step, len(initial)), k, step), k]:
        picks = order.picks(target)
        report(len(picks), k)
    return candidates[picks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m threeds.selection.pick_job", description=__doc__)
    parser.add_argument("--run", type=Path, required=True, help="the run directory")
    parser.add_argument("--rows", type=int, required=True, help="rows of metrics.parquet (checked against the embeddings)")
    parser.add_argument("--candidates", type=Path, required=True, help=".npy: rows k-center chooses among, ascending")
    parser.add_argument("--initial", type=Path, required=True, help=".npy: positions in candidates of the first centres")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, required=True, help="how many picks")
    parser.add_argument("--out", type=Path, required=True, help=".npy the picks are written to")
    parser.add_argument("--progress", type=Path, required=True, help="progress.json, rewritten as the job goes")
    parser.add_argument("--nice", type=int, default=NICE, help=f"added to the job's niceness (default {NICE}): the server and the browser "
                        "that show the controls come first on a machine of few cores; the job takes the CPU they leave")  # fmt: skip
    args = parser.parse_args(argv)
    if args.nice and hasattr(os, "nice"):
        os.nice(args.nice)
    try:
        candidates = np.load(args.candidates, allow_pickle=False)
        initial = np.load(args.initial, allow_pickle=False)
        picks = make_picks(args.run, args.rows, candidates, initial, args.seed, args.k, args.progress)
        atomic_write(args.out, lambda f: np.save(f, picks, allow_pickle=False))
    except (ThreedsError, OSError, ValueError, MemoryError) as exc:
        print(f"k-center picks for {args.run}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
