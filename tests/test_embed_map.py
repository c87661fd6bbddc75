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
