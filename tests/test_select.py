"""Percentile bands and k-center greedy (spec items 7 and 8), checked on hand-computed cases."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from threeds.config import SelectConfig
from threeds.errors import SettingsError
from threeds.names import METRICS, metric_column
from threeds.rundir.check import RunFileError, selected_records
from threeds.selection.apply import select_dir
from threeds.selection.arrays import NumpyOps, TorchOps
from threeds.selection.kcenter import (
    band_filter,
    band_thresholds,
    k_center_greedy,
    within,
)


def band_mask(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """One metric's band as band_filter applies it: percentiles of the finite values, bounds inclusive."""
    v = np.asarray(values, dtype=np.float64)
    return within(v, *band_thresholds(v, low, high))


def reference_kcenter(x: np.ndarray, k: int, seed: int) -> list[int]:
    """Spec item 8 written out directly in numpy float32 with exact (x - c)^2 distances."""
    x = np.asarray(x, dtype=np.float32)
    picks = [int(np.random.default_rng(seed).integers(len(x)))]
    min_dist = np.full(len(x), np.inf, dtype=np.float32)
    for _ in range(k - 1):
        d = ((x - x[picks[-1]]) ** 2).sum(1, dtype=np.float32)
        min_dist = np.minimum(min_dist, d)
        min_dist[picks] = -np.inf
        picks.append(int(np.argmax(min_dist)))  # np.argmax: first maximum = lowest index
    return picks


# ---------------------------------------------------------------------------- bands


def test_metric_column():
    assert metric_column("ins_ppl", "max") == "ins_ppl"
    assert metric_column("gen_wloss", "mean") == "gen_wloss_mean"
    assert metric_column("gt_wloss", "max") == "gt_wloss_max"
    with pytest.raises(ValueError, match="metric"):
        metric_column("ppl")
    with pytest.raises(ValueError, match="atten_method"):
        metric_column("gt_wloss", "sum")


def test_band_mask_by_hand():
    v = np.arange(1, 11, dtype=float)  # 1..10, n = 10
    # linear interpolation: position p/100 * (n - 1)
    # p25: 2.25 -> v[2] + 0.25 * (v[3] - v[2]) = 3 + 0.25 = 3.25
    # p75: 6.75 -> v[6] + 0.75 * (v[7] - v[6]) = 7 + 0.75 = 7.75
    # kept: 4, 5, 6, 7 (rows 3..6)
    assert band_mask(v, 25, 75).tolist() == [False] * 3 + [True] * 4 + [False] * 3
    assert band_mask(v, 0, 100).all()  # bounds are inclusive: p0 = 1, p100 = 10
    assert band_mask(v, 50, 50).sum() == 0  # p50 = 5.5 matches no value
    assert np.flatnonzero(band_mask(v, 10, 10)).tolist() == []  # p10 = 1.9


def test_band_mask_ignores_nan_and_inf():
    v = np.array([np.nan, 1, 2, 3, np.inf, 4, 5, 6, 7, 8, 9, 10, -np.inf])
    # percentiles over the finite 1..10 as above: [3.25, 7.75]
    assert v[band_mask(v, 25, 75)].tolist() == [4, 5, 6, 7]
    assert not band_mask(np.full(3, np.nan), 0, 100).any()


@pytest.mark.parametrize("low, high, message", [(-1, 50, "--ins-low -1: must be within 0-100"), (10, 101, "--ins-up 101: must be within 0-100"),
                                                (60, 40, "--ins-low 60: above --ins-up 40"), (np.nan, 50, "--ins-low nan: must be a finite number")])  # fmt: skip
def test_band_filter_rejects_bad_bands_by_the_settings_rules(low, high, message):
    """A band is checked once, by threeds.config's rules, with the flag that would carry it."""
    with pytest.raises(SettingsError, match=re.escape(message)):
        band_filter(_hand_metrics(), {"ins_ppl": (low, high)})


def _hand_metrics() -> pd.DataFrame:
    ins = np.arange(1, 11, dtype=float)  # rows 0..9 hold 1..10
    gen = ins[::-1].copy()  # rows 0..9 hold 10..1
    gt = np.array([np.nan] + list(range(1, 10)), dtype=float)  # row 0 NaN, rows 1..9 hold 1..9
    return pd.DataFrame({
        "id": [f"s{i}" for i in range(10)], "ins_ppl": ins,
        "gen_wloss_mean": gen, "gen_wloss_max": np.zeros(10),
        "gt_wloss_mean": gt, "gt_wloss_max": np.zeros(10),
    })  # fmt: skip


def test_band_filter_per_metric_bands_by_hand():
    bands = {"ins_ppl": (25, 75), "gen_wloss": (0, 50), "gt_wloss": (25, 100)}
    keep, report = band_filter(_hand_metrics(), bands, "mean")
    # ins_ppl 1..10, (25, 75) -> [3.25, 7.75] -> rows 3..6
    # gen 10..1, (0, 50) -> [1, 5.5] -> values 1..5 -> rows 5..9
    # gt finite 1..9 (rows 1..9), (25, 100) -> position 0.25 * 8 = 2 -> [3, 9] -> rows 3..9
    # intersection: rows 5, 6
    assert np.flatnonzero(keep).tolist() == [5, 6]
    assert report["n_total"] == 10
    assert report["n_excluded_nan"] == 1 and report["n_finite"] == 9
    assert report["n_kept"] == 2
    m = report["metrics"]
    assert (m["ins_ppl"]["lo"], m["ins_ppl"]["hi"]) == (3.25, 7.75)
    assert (m["gen_wloss"]["lo"], m["gen_wloss"]["hi"]) == (1.0, 5.5)
    assert (m["gt_wloss"]["lo"], m["gt_wloss"]["hi"]) == (3.0, 9.0)
    assert m["gt_wloss"]["column"] == "gt_wloss_mean"
    assert [m[k]["n_nan"] for k in METRICS] == [0, 0, 1]
    assert "truncation" in m["gt_wloss"]["nan_reason"]
    # among the finite rows 1..9, each band alone removes:
    # ins: rows 1, 2, 7, 8, 9; gen: rows 1..4; gt: rows 1, 2
    assert [m[k]["n_removed"] for k in METRICS] == [5, 4, 2]
    assert m["ins_ppl"]["name"] == "Instruction Understanding"
    json.dumps(report, allow_nan=False)


def test_band_filter_defaults_and_max_columns():
    df = _hand_metrics()
    keep, report = band_filter(df, None, "max")
    # *_max columns are all 0 -> every band [0, 0] keeps all; ins_ppl default (25, 75) -> rows 3..6
    assert np.flatnonzero(keep).tolist() == [3, 4, 5, 6]
    assert report["metrics"]["gt_wloss"]["n_nan"] == 0
    assert report["metrics"]["gt_wloss"]["band"] == [25.0, 75.0]


def test_band_filter_counts_nan_once_per_row_and_reports_no_finite_values():
    df = _hand_metrics()
    df.loc[0, "gen_wloss_mean"] = np.nan  # row 0 is NaN in two metrics: still one excluded row
    df.loc[4, "ins_ppl"] = np.inf
    keep, report = band_filter(df)
    assert report["n_excluded_nan"] == 2
    assert report["metrics"]["gen_wloss"]["n_nan"] == 1
    assert report["metrics"]["ins_ppl"]["n_nan"] == 1
    assert not keep[[0, 4]].any()
    df["gt_wloss_mean"] = np.nan
    keep, report = band_filter(df)
    assert not keep.any() and report["metrics"]["gt_wloss"]["lo"] is None


def test_band_filter_errors():
    with pytest.raises(ValueError, match="unknown metrics"):
        band_filter(_hand_metrics(), {"ppl": (0, 1)})
    with pytest.raises(ValueError, match="lacks columns"):
        band_filter(_hand_metrics().drop(columns="gt_wloss_mean"))


# ---------------------------------------------------------------------------- k-center


# seed 0 with n = 6: np.random.default_rng(0).integers(6) == 5, so row 5 is the first centre.
HAND_POINTS = np.array([
    [-1, 0],  # 0: squared distance to row 5 = 1
    [4, 0],   # 1: 16  - tied with row 2 for farthest; lowest index wins
    [0, 4],   # 2: 16
    [1, 1],   # 3: 2
    [0, -2],  # 4: 4
    [0, 0],   # 5: first centre
], dtype=np.float32)  # fmt: skip


def test_k_center_by_hand():
    assert np.random.default_rng(0).integers(6) == 5
    # after {5}: min d^2 = [1, 16, 16, 2, 4] -> tie 1 vs 2 -> 1
    # after {5, 1}: d^2 to (4,0): row0 25, row2 32, row3 10, row4 20 -> mins [1, -, 16, 2, 4] -> 2
    # after {5, 1, 2}: d^2 to (0,4): row0 17, row3 10, row4 36 -> mins [1, -, -, 2, 4] -> 4
    # after {.., 4}: d^2 to (0,-2): row0 5, row3 10 -> mins [1, 2] -> 3, then 0
    assert k_center_greedy(HAND_POINTS, 5, seed=0, device="cpu").tolist() == [5, 1, 2, 4, 3]
    assert k_center_greedy(HAND_POINTS, 3, seed=0, device="cpu").tolist() == [5, 1, 2]
    assert k_center_greedy(HAND_POINTS, 1, seed=0, device="cpu").tolist() == [5]
    assert reference_kcenter(HAND_POINTS, 5, 0) == [5, 1, 2, 4, 3]


def test_k_center_first_pick_follows_seed():
    x = np.random.default_rng(9).standard_normal((50, 3)).astype(np.float32)
    for seed in range(5):
        first = int(np.random.default_rng(seed).integers(50))
        assert k_center_greedy(x, 4, seed=seed, device="cpu")[0] == first


def test_k_center_duplicates_tie_to_lowest_index():
    # rows 1 and 3 are the same point; both are farthest from the first centre
    x = np.zeros((6, 2), dtype=np.float32)
    x[1] = x[3] = [5, 5]
    first = int(np.random.default_rng(0).integers(6))  # 5
    picks = k_center_greedy(x, 3, seed=0, device="cpu").tolist()
    assert picks[:2] == [first, 1]
    # then every unchosen row is at distance 0: lowest unchosen index
    assert picks[2] == 0
    assert picks == reference_kcenter(x, 3, 0)


def test_k_center_n_le_k_and_k_zero():
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    greedy = reference_kcenter(x, 4, 0)
    assert sorted(greedy) == [0, 1, 2, 3] and greedy != [0, 1, 2, 3]  # pick order, not index order
    assert k_center_greedy(x, 4).tolist() == greedy
    assert k_center_greedy(x, 10).tolist() == greedy
    assert k_center_greedy(x, 10, initial=[2]).tolist()[0] == 2
    assert k_center_greedy(x, 0).tolist() == []
    assert k_center_greedy(np.empty((0, 3), np.float32), 5).tolist() == []


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_k_center_picks_are_a_prefix_at_every_size(extra):
    """n in {k-1, k, k+1}: the picks for k are the first k of the picks for any larger k, in the same
    greedy order whether or not the survivors outnumber k (issue 23)."""
    k = 12
    x = np.random.default_rng(5).standard_normal((k + extra, 4)).astype(np.float32)
    longest = k_center_greedy(x, 3 * k, seed=1).tolist()
    assert sorted(longest) == list(range(len(x)))
    for m in range(1, 3 * k + 1):
        assert k_center_greedy(x, m, seed=1).tolist() == longest[:m], m
    assert longest[0] == int(np.random.default_rng(1).integers(len(x)))
    assert longest[: min(k, len(x))] == reference_kcenter(x, min(k, len(x)), 1)


def test_k_center_errors():
    x = np.ones((5, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="2-D"):
        k_center_greedy(np.ones(5), 2)
    with pytest.raises(ValueError, match="k must be"):
        k_center_greedy(x, -1)
    with pytest.raises(ValueError, match="dtype"):
        k_center_greedy(x, 2, dtype="int8")
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        k_center_greedy(x, 2, device="cpu")
    with pytest.raises(ValueError, match="float16"):
        k_center_greedy(np.array([[0.0], [1e6]], np.float32), 1, dtype="float16")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_k_center_equals_float32_reference(seed):
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    # exact duplicates of an outlier: picked early, must tie to the lower index
    x[10] *= 3
    x[1500] = x[10]
    expected = reference_kcenter(x, 300, seed)
    assert k_center_greedy(x, 300, seed=seed, device="cpu").tolist() == expected
    if seed == 0:
        assert 10 in expected and 1500 not in expected
        # chunked upload path (non-contiguous float64 input) and torch input give the same
        strided = np.asfortranarray(x.astype(np.float64))
        assert k_center_greedy(strided, 300, seed=seed, chunk_rows=333).tolist() == expected
        assert k_center_greedy(torch.from_numpy(x), 300, seed=seed).tolist() == expected


def test_k_center_widening_search_and_small_blocks(monkeypatch):
    """One row refreshed per try forces the search to widen (1, 4, 16, ...) on most picks."""
    import threeds.selection.kcenter as select

    rng = np.random.default_rng(5)
    x = rng.standard_normal((700, 16)).astype(np.float32)
    expected = reference_kcenter(x, 120, 1)
    monkeypatch.setattr(select, "_REFRESH_ROWS", 1)
    monkeypatch.setattr(select, "_TOP_ROWS", 20)  # the rows kept at hand: used, searched again, outgrown
    assert k_center_greedy(x, 120, seed=1, device="cpu").tolist() == expected
    assert k_center_greedy(x, 120, seed=1, device="cpu", chunk_rows=3).tolist() == expected


def test_first_copies():
    x = torch.tensor([[1.0, 2.0], [0.0, -0.0], [1.0, 2.0], [0.0, 0.0], [2.0, 1.0], [1.0, 2.0]])
    for dtype in (torch.float32, torch.float16):
        ops = TorchOps("cpu", str(dtype).removeprefix("torch."))
        rows = x.to(dtype)
        assert ops.first_copies(rows, ops.hash_rows(ops.f32(rows)), chunk_rows=2).tolist() == [0, 1, 0, 1, 4, 0]
    for dtype in ("float32", "float16"):  # the numpy backend's
        ops, rows = NumpyOps(dtype), x.numpy().astype(dtype)
        assert ops.first_copies(rows, ops.hash_rows(ops.f32(rows)), 2).tolist() == [0, 1, 0, 1, 4, 0]
    # a hash collision is not a copy: rows of equal hash that differ from the first of them keep their own index
    ops, rows = NumpyOps("float32"), x.numpy()
    assert ops.first_copies(rows, np.zeros(6, np.uint64), 2).tolist() == [0, 1, 0, 3, 4, 0]


def test_k_center_clustered_copies_farthest_within_round_off():
    """Clustered rows with exact copies: every pick is the farthest row up to float32 round-off
    of the distances (checked in float64), a copy is never picked before its first copy, and
    once every distinct row is a centre the rest follow in index order (all at distance 0)."""
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((8, 24)) * 6
    x = (centres[rng.integers(8, size=600)] + rng.standard_normal((600, 24))).astype(np.float32)
    x[300:400] = x[:100]  # rows 300..399 copy rows 0..99
    first = int(np.random.default_rng(2).integers(600))
    picks = k_center_greedy(x, 580, seed=2, device="cpu").tolist()
    assert picks[0] == first and len(set(picks)) == 580
    x64 = x.astype(np.float64)
    min_dist = np.full(600, np.inf)
    for step, pick in enumerate(picks[:-1]):
        min_dist = np.minimum(min_dist, ((x64 - x64[pick]) ** 2).sum(1))
        nxt = picks[step + 1]
        best = np.delete(min_dist, picks[: step + 1]).max()
        assert min_dist[nxt] >= best * (1 - 1e-5) - 1e-9, step
    head, tail = picks[:500], picks[500:]  # 500 distinct rows
    assert not [r for r in head[1:] if 300 <= r < 400]
    assert tail == sorted(tail) and set(tail) <= set(range(100)) | set(range(300, 400))


def _well_separated(n: int = 48, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Rotated, shifted, scaled basis vectors: min-distance gaps between candidates >= ~30%.

    Squared distance from row j to a centre c is s_j^2 + s_c^2, so after any set of centres the
    farthest row is the one with the largest remaining scale s_j, scales 1.15x apart. The 1e4
    offset leaves float16/bfloat16 too few bits unless the rows are centred before rounding.
    """
    rng = np.random.default_rng(seed)
    scales = 10 * 1.15 ** rng.permutation(n)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (np.eye(n, dim) * scales[:, None] @ q + 1e4).astype(np.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "float16"])
def test_k_center_half_storage_on_well_separated_data(dtype):
    x = _well_separated()
    expected = reference_kcenter(x, 40, 3)
    assert k_center_greedy(x, 40, seed=3, device="cpu", dtype=dtype).tolist() == expected
    # small chunks exercise the chunked float32 conversion of the half rows
    assert k_center_greedy(x, 40, seed=3, device="cpu", dtype=dtype, chunk_rows=7).tolist() == expected


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_numpy_and_torch_backends_pick_alike(monkeypatch, dtype):
    """On the CPU k-center runs on numpy (no torch import); the torch backend (GPU, bfloat16) runs the
    same algorithm: on random and clustered-with-copies data both equal the plain reference."""
    from threeds.selection import arrays
    from threeds.selection import kcenter as module

    rng = np.random.default_rng(4)
    noise = rng.standard_normal((400, 12)).astype(np.float32)
    copies = noise.copy()
    copies[200:260] = copies[:60]
    runs = {}
    for backend in ("numpy", "torch"):
        ops = arrays.NumpyOps if backend == "numpy" else (lambda d: arrays.TorchOps("cpu", d))
        monkeypatch.setattr(module, "ops_for", lambda device, d, ops=ops: ops(d))
        runs[backend] = [k_center_greedy(x, 150, seed=5, device="cpu", dtype=dtype, chunk_rows=37).tolist()
                         for x in (noise, copies)]  # fmt: skip
    assert runs["numpy"] == runs["torch"]
    if dtype == "float32":
        assert runs["numpy"][0] == reference_kcenter(noise, 150, 5)


def test_k_center_progress_bar(capsys):
    x = _well_separated()
    assert k_center_greedy(x, 10, seed=3, progress=True).tolist() == reference_kcenter(x, 10, 3)
    assert "k-center" in capsys.readouterr().err


# ---------------------------------------------------------------------------- run directory


def _make_run(tmp_path, n: int = 40, dim: int = 8):
    rng = np.random.default_rng(7)
    metrics = pd.DataFrame({
        "id": [f"r{i}" for i in range(n)], "ins_ppl": rng.uniform(1, 20, n),
        "gen_wloss_mean": rng.uniform(0, 3, n), "gen_wloss_max": rng.uniform(0, 3, n),
        "gt_wloss_mean": rng.uniform(0, 3, n), "gt_wloss_max": rng.uniform(0, 3, n),
    })  # fmt: skip
    metrics.loc[3, "gt_wloss_mean"] = np.nan
    metrics.loc[7, "gen_wloss_mean"] = np.nan
    metrics.to_parquet(tmp_path / "metrics.parquet")
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    np.save(tmp_path / "embeddings.npy", emb)
    with open(tmp_path / "data.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"id": f"r{i}", "instruction": f"问题 {i}", "output": f"a{i}", "source": "x"}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return metrics, emb


def test_select_dir(tmp_path):
    metrics, emb = _make_run(tmp_path)
    bands = {"ins_ppl": (10, 90), "gen_wloss": (5, 95)}
    result = select_dir(tmp_path, SelectConfig(ins_low=10, ins_up=90, conf_low=5, conf_up=95, sample_num=5, seed=1))
    keep, report = band_filter(metrics, bands)
    survivors = np.flatnonzero(keep)
    picks = reference_kcenter(emb[survivors], 5, 1)
    assert result["selected_rows"] == survivors[picks].tolist()
    assert result["selected_ids"] == [f"r{r}" for r in survivors[picks]]
    assert result["report"]["n_kept"] == report["n_kept"] == len(survivors)
    assert result["report"]["n_excluded_nan"] == 2
    assert result["report"]["n_selected"] == 5
    assert result["params"]["bands"]["gt_wloss"] == [25.0, 75.0]
    assert result["params"]["seed"] == 1 and result["params"]["sample_num"] == 5
    assert json.loads((tmp_path / "selection.json").read_text(encoding="utf-8")) == result
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == [
        "data.jsonl", "data_index.json", "data_index.npy", "embeddings.npy", "metrics.parquet", "pick_orders", "selection.json"
    ]  # fmt: skip (data_index: where each record starts, threeds.rundir.record_index)
    (stored,) = (tmp_path / "pick_orders").glob("*.npy")  # the order the app slices (threeds.selection.pick_order)
    assert np.load(stored).tolist() == list(picks)

    records = selected_records(tmp_path, result["selected_ids"])
    assert [r["id"] for r in records] == result["selected_ids"]
    r = int(result["selected_rows"][0])
    assert records[0] == {"id": f"r{r}", "instruction": f"问题 {r}", "output": f"a{r}", "source": "x"}
    with pytest.raises(RunFileError, match=r"data.jsonl: 1 selected ids not in it"):
        selected_records(tmp_path, ["r1", "nope"])


def test_select_dir_fewer_survivors_than_sample_num(tmp_path):
    metrics, emb = _make_run(tmp_path)
    result = select_dir(tmp_path, SelectConfig(sample_num=1000))
    survivors = np.flatnonzero(band_filter(metrics)[0])
    greedy = survivors[reference_kcenter(emb[survivors], len(survivors), 0)]
    assert result["selected_rows"] == greedy.tolist() != sorted(greedy)  # all of them, in pick order
    assert result["report"]["n_selected"] == len(survivors)


def test_select_dir_rejects_mismatched_embeddings(tmp_path):
    _make_run(tmp_path)
    np.save(tmp_path / "embeddings.npy", np.zeros((39, 8), np.float32))
    with pytest.raises(ValueError, match=r"\(39, 8\).*40 rows"):
        select_dir(tmp_path, SelectConfig())
    with pytest.raises(ValueError, match="--sample-num 0: must be at least 1"):
        select_dir(tmp_path, SelectConfig(sample_num=0))


def test_bench_baseline_matches_on_float16_exact_data():
    """bench/kcenter.py's copy of the original approach picks the same rows where float16 is exact."""
    from kcenter import baseline_kcenter

    x = np.random.default_rng(5).integers(-50, 50, (300, 8)).astype(np.float16)  # ties included
    assert baseline_kcenter(x, 40, 2) == k_center_greedy(x.astype(np.float32), 40, seed=2).tolist()


def test_k_center_lower_bounds_skip_centres_not_picks(tmp_path, monkeypatch):
    """Memory-mapped float16 rows in clusters, with exact copies and exact ties (small integers sum
    exactly in float32): the projection's lower bounds rule out most exact distances, and the picks
    equal the plain float32 reference and the run without bounds."""
    import threeds.selection.kcenter as select

    rng = np.random.default_rng(7)
    centres = rng.integers(-30, 30, (12, 48))
    x = centres[rng.integers(12, size=1500)] + rng.integers(-2, 3, (1500, 48))
    x[1000:1100] = x[:100]
    np.save(tmp_path / "emb.npy", x.astype(np.float16))
    rows = np.load(tmp_path / "emb.npy", mmap_mode="r")
    exact = []
    real_exact = select._LazyFarthest._exact

    def counted(self, rows, hidden, lo):
        exact[-1] += int((~hidden).sum())
        return real_exact(self, rows, hidden, lo)

    monkeypatch.setattr(select._LazyFarthest, "_exact", counted)
    monkeypatch.setattr(select, "_BOUND_MIN_ROWS", 1000)  # 1500 rows: projected as a large input would be
    expected = reference_kcenter(x, 400, 4)
    exact.append(0)
    assert k_center_greedy(rows, 400, seed=4, device="cpu").tolist() == expected
    monkeypatch.setattr(select._Projection, "directions", classmethod(lambda cls, x, ops: None))
    exact.append(0)
    assert k_center_greedy(rows, 400, seed=4, device="cpu").tolist() == expected
    assert exact[0] < exact[1] / 3, exact
    assert expected[0] == 1089  # the seed's first centre is a copy: its original is then at distance 0
    assert not [r for r in expected[1:] if 1000 <= r < 1100 and r - 1000 not in expected[: expected.index(r)]]


def test_k_center_blas_on_one_thread_and_start_pass_in_small_blocks(monkeypatch):
    """The greedy's products run on one BLAS thread (a second one spins on a busy machine: 20x the
    CPU time), the setting is put back after; float16 rows go through the start's pass (norms,
    projection, hashes) in blocks of 7 rows converted into one buffer, and pick as the reference."""
    from threadpoolctl import threadpool_info

    import threeds.selection.kcenter as select

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    during = []
    real_exact = select._LazyFarthest._exact

    def watched(self, rows, hidden, lo):
        during.append(blas_threads())
        return real_exact(self, rows, hidden, lo)

    monkeypatch.setattr(select._LazyFarthest, "_exact", watched)
    monkeypatch.setattr(select, "_PASS_ROWS", 7)
    monkeypatch.setattr(select, "_BOUND_MIN_ROWS", 100)
    monkeypatch.setattr(select, "_TOP_ROWS", 80)
    rng = np.random.default_rng(9)
    x = (rng.integers(-20, 20, (10, 32))[rng.integers(10, size=500)] + rng.integers(-3, 4, (500, 32))).astype(np.float16)
    x[400:450] = x[:50]  # copies, found through the hashes of the blocks
    expected = reference_kcenter(x.astype(np.float32), 120, 6)
    assert k_center_greedy(x, 120, seed=6, device="cpu").tolist() == expected
    assert during and all(threads == [1] * len(before) for threads in during)
    assert blas_threads() == before


def test_bands_from_a_sorted_pool_are_numpys_percentiles_to_the_bit():
    """`percentile_of_sorted` equals np.percentile exactly (its index and two-sided interpolation),
    and filter_rows given the pool's sorted values (as the app keeps them per pool, from each
    column's order) returns what it computes itself, NaN, inf and a quality pool included."""
    from threeds.selection.apply import column_order, filter_rows, pool_rows, sorted_pool
    from threeds.selection.kcenter import finite_sorted, percentile_of_sorted

    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 7, 100, 1001):
        values = np.round(rng.normal(size=n) * 10.0 ** rng.integers(-2, 3), int(rng.integers(0, 4)))
        for q in (0.0, 100.0, 25.0, 75.0, 33.3, 66.7, 12.5, 99.9, float(rng.uniform(0, 100))):
            assert percentile_of_sorted(finite_sorted(values), q) == np.percentile(values, q), (n, q)
    assert np.isnan(percentile_of_sorted(np.empty(0), 50.0))
    n = 500
    metrics = pd.DataFrame({"id": [f"s{i}" for i in range(n)], **{c: rng.gamma(2.0, 1.0, n) for c in ("ins_ppl", "gt_wloss_mean", "gt_wloss_max", "gen_wloss_mean", "gen_wloss_max")}})
    metrics.loc[rng.choice(n, 20), "ins_ppl"] = np.nan
    metrics.loc[rng.choice(n, 5), "gen_wloss_mean"] = np.inf
    quality = rng.uniform(60, 100, n)
    quality[:7] = np.nan
    for config in (SelectConfig(sample_num=5), SelectConfig(quality_threshold=90.0, ins_low=10.0, conf_up=95.0, corr_low=40.0, corr_up=41.0),
                   SelectConfig(quality_threshold=None, atten_method="max", ins_low=0.0, ins_up=100.0)):  # fmt: skip
        in_pool = pool_rows(config, n, quality)[1]
        columns = {m: metric_column(m, config.atten_method) for m in METRICS}
        ordered = sorted_pool({m: column_order(metrics[c].to_numpy()) for m, c in columns.items()}, in_pool)
        fast, plain = filter_rows(config, metrics, quality, sorted_finite=ordered), filter_rows(config, metrics, quality)
        assert (fast.in_bands == plain.in_bands).all() and fast.report == plain.report and 0 < plain.report["n_kept"] < n
        copied, report = band_filter(metrics.iloc[np.flatnonzero(in_pool)], config.bands(), config.atten_method)  # the pool as a frame of its own
        assert report == plain.report and (np.flatnonzero(in_pool)[copied] == np.flatnonzero(plain.in_bands)).all()
