"""The 2-D map of instruction embeddings.

UMAP takes minutes on 100k rows, so it runs once per run: the result is cached as `umap.npy`
in the run directory with `umap.json` saying which embeddings and settings produced it; a
re-scored run (different embeddings) or other settings recompute it.

UMAP on all rows is out of reach past a few hundred thousand rows on a CPU (hours, and umap-learn
ran out of 32 GB on 1.6M x 300). A run with more than FIT_ROWS rows is mapped from a sample
(`fit_rows`): FIT_ROWS rows stratified by the quartiles of the three difficulty metrics (each of
the 64 quartile cells, and the rows with a missing metric, in proportion to its size), projected
on their first PCA_DIMS principal axes, fitted by UMAP; every other row is then projected the same
way and placed with UMAP's `transform`, TRANSFORM_ROWS at a time, read from the memory-mapped
embeddings chunk by chunk. `umap.json` then says so (`fit`), and the app names the rows it was
fitted on. The embeddings a large map came from are named by a digest of DIGEST_ROWS evenly
spaced rows (every row up to that size), since hashing 1.9M x 4096 values would take minutes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import pandas as pd

from threeds.io.array_cache import array_digest, read_cached, write_cached
from threeds.names import METRICS, metric_column
from threeds.rundir import layout

MIN_POINTS = 4  # UMAP needs a neighbour graph; fewer points make no map
FIT_ROWS = 20_000  # rows UMAP is fitted on when a run has more; the rest are placed by `transform`
PCA_DIMS = 64  # principal axes a sampled map works in (UMAP's transform on 4096 dims is ~60x slower)
TRANSFORM_ROWS = 25_000  # rows read and placed at a time
DIGEST_ROWS = 65_536  # rows hashed to name the embeddings of a map


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
    return umap_reducer(n, settings).fit_transform(np.asarray(embeddings, dtype=np.float32)).astype(np.float32)


def umap_reducer(n: int, settings: MapSettings):
    """umap-learn's UMAP for a fit on n rows (the slow numba import only when a map is computed)."""
    import umap

    return umap.UMAP(
        n_components=2,
        n_neighbors=min(settings.n_neighbors, n - 1),
        min_dist=settings.min_dist,
        random_state=settings.seed,
        n_jobs=1,  # a fixed seed makes umap-learn single-threaded anyway
        init="spectral" if n > 32 else "random",  # spectral init fails on tiny graphs
    )


def strata(metrics: pd.DataFrame, atten_method: str = "mean") -> np.ndarray:
    """Per row, its cell of the three metrics' quartiles (0..63), or 64 when a metric is missing."""
    label = np.zeros(len(metrics), dtype=np.int64)
    missing = np.zeros(len(metrics), dtype=bool)
    for metric in METRICS:
        values = metrics[metric_column(metric, atten_method)].to_numpy(dtype=np.float64)
        finite = np.isfinite(values)
        missing |= ~finite
        edges = np.percentile(values[finite], [25, 50, 75]) if finite.any() else np.zeros(3)
        label = label * 4 + np.searchsorted(edges, np.where(finite, values, 0.0), side="right")
    return np.where(missing, 4 ** len(METRICS), label)


def stratified_sample(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """`size` rows (all when there are no more), drawn from each stratum in proportion to its
    size (largest remainders first), ascending; the same rows for the same labels and seed."""
    n = len(labels)
    if size >= n:
        return np.arange(n)
    kinds, counts = np.unique(labels, return_counts=True)
    share = counts * size / n
    take = np.floor(share).astype(np.int64)
    take[np.argsort(-(share - take), kind="stable")[: size - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == kind), size=want, replace=False) for kind, want in zip(kinds, take) if want]
    return np.sort(np.concatenate(chosen))


def fit_rows(metrics: pd.DataFrame, settings: MapSettings = MapSettings(), size: int = FIT_ROWS) -> np.ndarray:
    """The rows a run's map is fitted on: all of a run up to `size` rows, else a stratified sample."""
    return stratified_sample(strata(metrics), size, settings.seed)


def sampled_umap(embeddings: np.ndarray, fitted: np.ndarray, settings: MapSettings = MapSettings()) -> np.ndarray:
    """2-D coordinates of every row: UMAP fitted on the rows `fitted` (in PCA_DIMS principal
    axes of theirs), every other row placed by `transform`, TRANSFORM_ROWS at a time."""
    from sklearn.utils.extmath import randomized_svd

    sample = np.asarray(embeddings[fitted], dtype=np.float32)
    centre = sample.mean(0)
    axes = randomized_svd(sample - centre, min(PCA_DIMS, *sample.shape), random_state=settings.seed)[2].T.astype(np.float32)
    project = lambda rows: (np.asarray(rows, dtype=np.float32) - centre) @ axes  # noqa: E731
    reducer = umap_reducer(len(fitted), settings)
    coords = np.empty((len(embeddings), 2), dtype=np.float32)
    coords[fitted] = reducer.fit_transform(project(sample))
    rest = np.ones(len(embeddings), dtype=bool)
    rest[fitted] = False
    for start in range(0, len(embeddings), TRANSFORM_ROWS):
        rows = start + np.flatnonzero(rest[start : start + TRANSFORM_ROWS])
        if len(rows):
            coords[rows] = reducer.transform(project(embeddings[rows]))
    return coords


def embeddings_digest(embeddings: np.ndarray) -> str:
    """Names the embeddings a map came from: `array_digest` of DIGEST_ROWS evenly spaced rows (all up to that)."""
    step = max(1, -(-len(embeddings) // DIGEST_ROWS))
    return array_digest(embeddings[::step])


def load_or_compute_umap(
    run_dir: str | os.PathLike, embeddings: np.ndarray, settings: MapSettings = MapSettings(), metrics: pd.DataFrame | None = None
) -> np.ndarray:
    """The run's cached map if it matches `embeddings` and `settings`, else compute and cache it;
    with `metrics` and more than FIT_ROWS rows, a sampled map (the module's docstring)."""
    run_dir = Path(run_dir)
    meta = {"embeddings_sha256": embeddings_digest(embeddings), "rows": len(embeddings), **settings.__dict__}
    sampled = metrics is not None and len(embeddings) > FIT_ROWS
    if sampled:
        meta["fit"] = fit_description()
    array, description = (run_dir / name for name in layout.UMAP)
    cached = read_cached(array, description, meta, (len(embeddings), 2))
    if cached is not None:
        return cached
    coords = sampled_umap(embeddings, fit_rows(metrics, settings), settings) if sampled else compute_umap(embeddings, settings)
    write_cached(array, description, coords, meta)
    return coords


def fit_description() -> dict:
    """What `umap.json` says of a sampled map's fit (the app shows it)."""
    return {"rows": FIT_ROWS, "stratified_by": "quartiles of the three metrics (mean attention)", "pca_dims": PCA_DIMS}


def map_fit(run_dir: str | os.PathLike) -> dict | None:
    """The `fit` of the run's cached map (None: fitted on every row, or no map yet)."""
    try:
        found = json.loads((Path(run_dir) / layout.UMAP[1]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found.get("fit") if isinstance(found, dict) else None
