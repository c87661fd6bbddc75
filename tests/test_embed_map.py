"""The cached UMAP map."""

from __future__ import annotations

import json

import numpy as np
import pytest

from threeds.views import embed_map
from threeds.views.embed_map import MapSettings, load_or_compute_umap


def clustered(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (4, dim))
    return (centres[rng.integers(0, 4, n)] + rng.normal(0, 1, (n, dim))).astype(np.float32)


def test_umap_is_deterministic_and_cached(tmp_path, monkeypatch):
    """One real UMAP fit (numba compiles on first use: ~30 s on a shared 2-core machine)."""
    emb = clustered(60)
    first = load_or_compute_umap(tmp_path, emb)
    assert first.shape == (60, 2) and first.dtype == np.float32 and np.isfinite(first).all()
    assert np.array_equal(embed_map.compute_umap(emb), first)  # fixed seed: same map again
    meta = json.loads((tmp_path / "umap.json").read_text())
    assert meta["rows"] == 60 and meta["seed"] == 0

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although the cache matches")

    monkeypatch.setattr(embed_map, "compute_umap", refuse)
    assert np.array_equal(load_or_compute_umap(tmp_path, emb), first)


@pytest.fixture()
def fake_umap(monkeypatch):
    calls = []

    def fake(embeddings, settings=MapSettings()):
        calls.append(len(embeddings))
        return np.asarray(embeddings[:, :2], dtype=np.float32) + settings.seed

    monkeypatch.setattr(embed_map, "compute_umap", fake)
    return calls


def test_cache_is_invalidated_by_new_embeddings_or_settings(tmp_path, fake_umap):
    emb = clustered(20)
    load_or_compute_umap(tmp_path, emb)
    load_or_compute_umap(tmp_path, emb)
    assert fake_umap == [20]
    emb2 = emb.copy()
    emb2[0, 0] += 1
    load_or_compute_umap(tmp_path, emb2)
    load_or_compute_umap(tmp_path, emb2, MapSettings(seed=1))
    assert fake_umap == [20, 20, 20]


@pytest.mark.parametrize("damage", [lambda d: (d / "umap.npy").write_bytes(b"junk"), lambda d: (d / "umap.json").write_text("{")])
def test_corrupt_cache_is_recomputed(tmp_path, fake_umap, damage):
    emb = clustered(20)
    expected = load_or_compute_umap(tmp_path, emb)
    damage(tmp_path)
    assert np.array_equal(load_or_compute_umap(tmp_path, emb), expected)
    assert fake_umap == [20, 20]


def test_too_few_points():
    with pytest.raises(ValueError, match="at least 4"):
        embed_map.compute_umap(np.zeros((3, 5), np.float32))


def test_stratified_sample_takes_each_stratum_in_proportion_hand_checked():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)  # 60%, 30%, 10%
    rows = embed_map.stratified_sample(labels, 5, seed=0)
    # shares 3.0, 1.5, 0.5: floors 3, 1, 0; the one left goes to the larger remainder (stratum 1, first)
    assert np.bincount(labels[rows], minlength=3).tolist() == [3, 2, 0]
    assert rows.tolist() == sorted(set(rows.tolist())) and np.array_equal(rows, embed_map.stratified_sample(labels, 5, seed=0))
    assert embed_map.stratified_sample(labels, 10).tolist() == list(range(10))  # no more rows than asked: all


def test_strata_are_the_three_metrics_quartile_cells():
    import pandas as pd

    values = np.arange(8.0)
    metrics = pd.DataFrame({"ins_ppl": values, "gt_wloss_mean": values, "gen_wloss_mean": values[::-1].copy()})
    metrics.loc[3, "gt_wloss_mean"] = np.nan
    cells = embed_map.strata(metrics)
    # quartile edges of 0..7: 1.75, 3.5, 5.25 -> quartiles 0,0,1,1,2,2,3,3 (reversed for gen_wloss)
    q = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    expected = (q * 4 + q[::-1]) * 4 + q  # METRICS order: ins_ppl, gen_wloss, gt_wloss
    expected[3] = 64  # a missing metric: its own stratum
    assert cells.tolist() == expected.tolist()


def test_a_large_run_is_fitted_on_a_sample_and_every_row_placed_by_transform(tmp_path, monkeypatch):
    """The sampled path with a real UMAP (fit + transform): FIT_ROWS rows stratified by the metrics,
    the rest placed in chunks, cached with its fit described; brushed rows are every row inside."""
    import pandas as pd

    from app_pages import raster

    monkeypatch.setattr(embed_map, "FIT_ROWS", 60)
    monkeypatch.setattr(embed_map, "TRANSFORM_ROWS", 50)
    n = 160
    emb = clustered(n, dim=12).astype(np.float16)  # float16 on disk is accepted
    rng = np.random.default_rng(1)
    metrics = pd.DataFrame({c: rng.random(n) for c in ("ins_ppl", "gt_wloss_mean", "gen_wloss_mean")})
    coords = load_or_compute_umap(tmp_path, emb, metrics=metrics)
    assert coords.shape == (n, 2) and np.isfinite(coords).all()
    fitted = embed_map.fit_rows(metrics, size=60)
    assert len(fitted) == 60
    meta = json.loads((tmp_path / "umap.json").read_text())
    assert meta["fit"] == embed_map.fit_description() == embed_map.map_fit(tmp_path) and meta["fit"]["rows"] == 60
    placed = np.setdiff1d(np.arange(n), fitted)
    # a placed row lands next to fitted rows that are near it in the embedding space, not at random
    nearest = fitted[np.argmin(((coords[placed, None, :] - coords[None, fitted, :]) ** 2).sum(-1), axis=1)]
    same = np.linalg.norm(emb[placed].astype(np.float32) - emb[nearest].astype(np.float32), axis=1)
    far = np.linalg.norm(emb[placed].astype(np.float32) - emb[rng.choice(fitted, len(placed))].astype(np.float32), axis=1)
    assert np.median(same) < np.median(far)

    monkeypatch.setattr(embed_map, "sampled_umap", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert np.array_equal(load_or_compute_umap(tmp_path, emb, metrics=metrics), coords)  # cached
    box = {"x": [float(coords[:, 0].min()), float(np.median(coords[:, 0]))], "y": [-1e9, 1e9]}
    rows = raster.selected_rows(coords[:, 0], coords[:, 1], [box], [])
    assert rows.tolist() == np.flatnonzero(coords[:, 0] <= np.median(coords[:, 0])).tolist()  # every row inside, fitted or placed
