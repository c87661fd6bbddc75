"""The 2-D map of instruction embeddings.

UMAP takes minutes on 100k rows, so it runs once per run: the result is cached as `umap.npy`
in the run directory with `umap.json` saying which embeddings and settings produced it; a
re-scored run (different embeddings) or other settings recompute it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from threeds.io.array_cache import array_digest, read_cached, write_cached
from threeds.rundir import layout

MIN_POINTS = 4  # UMAP needs a neighbour graph; fewer points make no map


@dataclass(frozen=True)
class MapSettings:
    seed: int = 0
    n_neighbors: int = 15
    min_dist: float = 0.1


def compute_umap(embeddings: np.ndarray, settings: MapSettings = MapSettings()) -> np.ndarray:
    """2-D UMAP coordinates [n, 2] (float32); deterministic for a fixed seed."""
    n = len(embeddings)
    if n < MIN_POINTS:
        raise ValueError(f"a map needs at least {MIN_POINTS} samples, this run has {n}")
    import umap  # slow import (numba): only when a map is actually computed

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(settings.n_neighbors, n - 1),
        min_dist=settings.min_dist,
        random_state=settings.seed,
        n_jobs=1,  # a fixed seed makes umap-learn single-threaded anyway
        init="spectral" if n > 32 else "random",  # spectral init fails on tiny graphs
    )
    return reducer.fit_transform(np.asarray(embeddings, dtype=np.float32)).astype(np.float32)


def load_or_compute_umap(
    run_dir: str | os.PathLike, embeddings: np.ndarray, settings: MapSettings = MapSettings()
) -> np.ndarray:
    """The run's cached map if it matches `embeddings` and `settings`, else compute and cache it."""
    run_dir = Path(run_dir)
    meta = {"embeddings_sha256": array_digest(embeddings), "rows": len(embeddings), **settings.__dict__}
    array, description = (run_dir / name for name in layout.UMAP)
    cached = read_cached(array, description, meta, (len(embeddings), 2))
    if cached is not None:
        return cached
    coords = compute_umap(embeddings, settings)
    write_cached(array, description, coords, meta)
    return coords
