"""What storing embeddings as float16 (`threeds score --embeddings-dtype float16`) does to k-center's picks.

On a run with float32 embeddings: the band survivors of the paper's settings, k-center over their
rows as stored (float32) and over the same rows rounded to float16 (what a float16 embeddings.npy
holds; arithmetic stays float32). Reported: how many picks the two share, the first pick where
they part, and each selection's k-center objective (the largest distance from a survivor to its
nearest pick, measured on the float32 rows): the quantity the greedy keeps small.

    python bench/half_picks.py --run /work/scale/m896 --k 5000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threeds.config import SelectConfig  # noqa: E402
from threeds.rundir.check import load_scored  # noqa: E402
from threeds.rundir.read import read_ratings  # noqa: E402
from threeds.rundir.layout import RATINGS  # noqa: E402
from threeds.selection.apply import filter_rows, quality_per_row  # noqa: E402
from threeds.selection.kcenter import k_center_greedy  # noqa: E402


def radius(x: np.ndarray, picks: np.ndarray, chunk: int = 8192) -> float:
    """max over rows of the distance to the nearest pick (float64 sums of float32 products)."""
    centres = x[picks].astype(np.float64)
    c2 = (centres**2).sum(1)
    worst = 0.0
    for s in range(0, len(x), chunk):
        rows = x[s : s + chunk].astype(np.float64)
        d = (rows**2).sum(1)[:, None] + c2[None] - 2 * rows @ centres.T
        worst = max(worst, float(np.sqrt(np.maximum(d.min(1), 0)).max()))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--k", type=int, default=5000)
    args = parser.parse_args()
    metrics, emb = load_scored(args.run)
    config = SelectConfig(sample_num=args.k, quality_threshold=85.0)
    done = filter_rows(config, metrics, quality_per_row(read_ratings(args.run / RATINGS), metrics["id"]))
    x32 = np.ascontiguousarray(emb[done.candidates], dtype=np.float32)
    x16 = x32.astype(np.float16)
    out = {"run": str(args.run), "candidates": len(x32), "dim": x32.shape[1], "k": args.k}
    picks = {}
    for name, rows in (("float32", x32), ("float16", x16)):
        began = time.perf_counter()
        picks[name] = k_center_greedy(rows, args.k, seed=config.seed, device="cpu")
        out[f"{name}_seconds"] = round(time.perf_counter() - began, 1)
        out[f"{name}_radius"] = round(radius(x32, picks[name]), 4)
    same = picks["float32"] == picks["float16"]
    out["shared_picks"] = len(set(picks["float32"].tolist()) & set(picks["float16"].tolist()))
    out["first_difference"] = int(np.argmin(same)) if not same.all() else None
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
