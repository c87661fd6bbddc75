"""Time the embedding map of a large run: the stratified sample, UMAP's fit on it and the
placement of every other row by `transform` (threeds.views.embed_map), as the app's first map
visit computes it. Writes the map into the run directory (umap.npy / umap.json: the app's cache,
what that first visit would leave) unless --out names another folder.

    flock /work/scale.lock python bench/map_scale.py --run /work/scale/paper
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threeds.rundir import layout  # noqa: E402
from threeds.views import embed_map  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="folder for umap.npy / umap.json (default: the run)")
    args = parser.parse_args()
    out = args.out or args.run
    out.mkdir(parents=True, exist_ok=True)
    for name in layout.UMAP:
        (out / name).unlink(missing_ok=True)
    began = time.perf_counter()
    metrics = pd.read_parquet(args.run / layout.METRICS)
    embeddings = np.load(args.run / layout.EMBEDDINGS, mmap_mode="r", allow_pickle=False)
    fitted = embed_map.fit_rows(metrics)
    sampled = time.perf_counter()
    timings = {}
    real_transform = embed_map.umap_reducer

    def timed_reducer(n, settings):  # the fit and the transforms timed apart
        reducer = real_transform(n, settings)
        fit, transform = reducer.fit_transform, reducer.transform

        def fit_timed(x):
            start = time.perf_counter()
            result = fit(x)
            timings["fit"] = time.perf_counter() - start
            return result

        def transform_timed(x):
            start = time.perf_counter()
            result = transform(x)
            timings["transform"] = timings.get("transform", 0.0) + time.perf_counter() - start
            return result

        reducer.fit_transform, reducer.transform = fit_timed, transform_timed
        return reducer

    embed_map.umap_reducer = timed_reducer
    coords = embed_map.load_or_compute_umap(out, embeddings, metrics=metrics)
    total = time.perf_counter() - began
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"run {args.run} ({len(embeddings):,} x {embeddings.shape[1]} {embeddings.dtype}); load average {os.getloadavg()[0]:.1f}")
    print(f"fitted on {len(fitted):,} rows ({embed_map.fit_description()}), PCA to {embed_map.PCA_DIMS} dims")
    print(f"metrics read + stratified sample: {sampled - began:.1f} s")
    print(f"UMAP fit on the sample: {timings.get('fit', 0):.1f} s")
    print(f"transform of the other {len(embeddings) - len(fitted):,} rows: {timings.get('transform', 0):.1f} s")
    print(f"whole map, reads and PCA included: {total:.1f} s; peak RSS {rss:.2f} GiB; finite: {bool(np.isfinite(coords).all())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
