"""k-center pick orders: sliced, continued, and kept in the run directory across processes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from synthetic_run import make_run

from threeds.config import SelectConfig
from threeds.rundir.layout import PICK_ORDERS
from threeds.rundir.read import load_run
from threeds.selection import kcenter as select
from threeds.selection import pick_order
from threeds.selection.apply import filter_rows, quality_per_row, select_dir
from threeds.selection.kcenter import k_center_greedy
from threeds.selection.pick_order import KEEP_ORDERS, PickOrder


def clustered(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (4, dim))
    return (centres[rng.integers(0, 4, n)] + rng.normal(0, 1, (n, dim))).astype(np.float32)


@pytest.fixture()
def steps(monkeypatch) -> list:
    """One entry per farthest-point step the greedy makes."""
    made: list = []
    real = select._LazyFarthest.farthest
    monkeypatch.setattr(select._LazyFarthest, "farthest", lambda self: made.append(1) or real(self))
    return made


def test_pick_order_slices_equal_the_library_call():
    emb = clustered(50)
    order = PickOrder(emb, seed=3)
    for k in (5, 1, 12, 30, 7, 49):
        assert np.array_equal(order.picks(k), k_center_greedy(emb, k, seed=3)), k
    assert np.array_equal(order.picks(50), k_center_greedy(emb, 50, seed=3))  # all survivors
    assert np.array_equal(order.picks(80), k_center_greedy(emb, 50, seed=3))  # still in pick order
    assert np.array_equal(order.picks(50)[:49], order.picks(49))


def test_pick_order_continues_the_greedy_and_never_recomputes_a_pick(steps):
    emb = clustered(100)
    sizes = (10, 5, 10, 11, 15, 20, 21, 3)
    expected = {k: k_center_greedy(emb, k, initial=[4, 60]) for k in sizes}
    steps.clear()
    order = PickOrder(emb, initial=(4, 60))
    for k in sizes:
        assert np.array_equal(order.picks(k), expected[k]), k
    assert len(steps) == 21 - 2  # each pick past the two initial centres made once


def test_a_stored_order_serves_a_new_process_without_a_step(tmp_path, steps):
    emb = clustered(120)
    expected = k_center_greedy(emb, 30, seed=2)
    steps.clear()
    first = PickOrder(emb, seed=2, run_dir=tmp_path).picks(30)
    assert np.array_equal(first, expected) and len(steps) == 29
    meta = json.loads(next((tmp_path / PICK_ORDERS).glob("*.json")).read_text())
    assert meta["rows"] == 120 and meta["seed"] == 2 and meta["initial"] == [] and meta["dtype"] == "float32"
    steps.clear()
    again = PickOrder(emb, seed=2, run_dir=tmp_path)  # as a fresh app session would
    assert np.array_equal(again.picks(30), first) and np.array_equal(again.picks(12), first[:12])
    assert steps == []


@pytest.mark.parametrize("initial", [(), (7, 99)])
def test_past_the_stored_picks_the_same_greedy_continues(tmp_path, steps, initial):
    emb = np.concatenate([clustered(150), clustered(150)[:20]])  # exact copies: ties on index
    PickOrder(emb, initial=initial, run_dir=tmp_path).picks(25)
    expected = {k: k_center_greedy(emb, k, initial=initial) for k in (25, 40, 60)}
    steps.clear()
    order = PickOrder(emb, initial=initial, run_dir=tmp_path)
    for k in (40, 25, 60):
        assert np.array_equal(order.picks(k), expected[k]), k
    assert len(steps) == 60 - 25  # only the picks past the stored 25
    steps.clear()
    assert np.array_equal(PickOrder(emb, initial=initial, run_dir=tmp_path).picks(60), order.picks(60)) and steps == []


def test_other_candidates_or_seed_do_not_reuse_an_order(tmp_path):
    emb = clustered(80)
    PickOrder(emb, seed=0, run_dir=tmp_path).picks(20)
    assert np.array_equal(PickOrder(emb, seed=5, run_dir=tmp_path).picks(20), k_center_greedy(emb, 20, seed=5))
    assert np.array_equal(PickOrder(emb[1:], run_dir=tmp_path).picks(20), k_center_greedy(emb[1:], 20))
    assert len(list((tmp_path / PICK_ORDERS).glob("*.npy"))) == 3


@pytest.mark.parametrize(
    "damage",
    [
        lambda npy: npy.write_bytes(b"junk"),
        lambda npy: np.save(npy, np.array([3, 3, 4])),  # repeated pick
        lambda npy: np.save(npy, np.array([0, 500])),  # out of range
        lambda npy: np.save(npy, np.array([0.5, 1.0])),  # not indices
        lambda npy: npy.with_suffix(".json").write_text("{"),
    ],
)
def test_a_damaged_store_is_recomputed(tmp_path, damage):
    emb = clustered(60)
    expected = PickOrder(emb, run_dir=tmp_path).picks(15)
    damage(next((tmp_path / PICK_ORDERS).glob("*.npy")))
    assert np.array_equal(PickOrder(emb, run_dir=tmp_path).picks(15), expected)


def test_a_store_that_misses_the_include_rows_is_not_used(tmp_path):
    emb = clustered(60)
    order = PickOrder(emb, initial=(5, 9), run_dir=tmp_path)
    order.picks(10)
    npy = next((tmp_path / PICK_ORDERS).glob("*.npy"))
    np.save(npy, np.array([9, 5, 1]))  # the include rows in another order
    assert np.array_equal(PickOrder(emb, initial=(5, 9), run_dir=tmp_path).picks(10), k_center_greedy(emb, 10, initial=(5, 9)))


def test_only_the_newest_orders_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(pick_order, "KEEP_ORDERS", 3)
    emb = clustered(40)
    for seed in range(5):
        PickOrder(emb, seed=seed, run_dir=tmp_path).picks(4)
        for path in (tmp_path / PICK_ORDERS).glob(f"*-{seed}-*"):  # the order of writing, clear to mtime
            os.utime(path, (seed, seed))
    kept = sorted(json.loads(p.read_text())["seed"] for p in (tmp_path / PICK_ORDERS).glob("*.json"))
    assert kept == [2, 3, 4] and len(list((tmp_path / PICK_ORDERS).glob("*.npy"))) == 3
    assert KEEP_ORDERS >= 8


def test_an_unwritable_run_directory_only_costs_the_greedy(tmp_path):
    (tmp_path / PICK_ORDERS).write_text("a file where the folder should be")
    emb = clustered(50)
    assert np.array_equal(PickOrder(emb, run_dir=tmp_path).picks(9), k_center_greedy(emb, 9))


def test_threeds_select_leaves_the_order_the_app_slices(tmp_path, steps):
    run_dir = make_run(tmp_path / "run", n=200, n_dropped=10)
    config = SelectConfig(sample_num=12, seed=1)
    chosen = select_dir(run_dir, config)
    assert len(list((run_dir / PICK_ORDERS).glob("*.npy"))) == 1
    run = load_run(run_dir)
    done = filter_rows(config, run.metrics, quality_per_row(run.ratings, run.metrics["id"]))
    assert len(done.candidates) > 12
    steps.clear()
    order = PickOrder(np.ascontiguousarray(run.embeddings[done.candidates]), 1, done.initial, run_dir)  # as the app does
    assert done.candidates[order.picks(12)].tolist() == chosen["selected_rows"] and steps == []
    assert done.candidates[order.picks(5)].tolist() == chosen["selected_rows"][:5]
