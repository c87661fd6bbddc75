"""threeds.outcomes.stats against hand computations on tiny inputs (and scipy where installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from threeds.outcomes.stats import (
    Z_MDE,
    common_ids,
    holm,
    majority_share,
    mcnemar_exact,
    mde_80,
    percentile_ci,
    summarize,
)


def rows(correct: list[int], golds: list[int] | None = None, subjects: list[str] | None = None,
         prefix: str = "q") -> list[dict]:  # fmt: skip
    golds = golds or [0] * len(correct)
    subjects = subjects or ["s"] * len(correct)
    return [{"id": f"{prefix}{i}", "gold": g, "correct": bool(c), "correct_norm": not c, "gold_prob": 0.25 + 0.5 * c,
             "subject": s} for i, (c, g, s) in enumerate(zip(correct, golds, subjects))]  # fmt: skip


@pytest.mark.parametrize(("b", "c", "p"), [
    (0, 0, 1.0), (1, 0, 1.0), (5, 0, 2 / 32), (0, 5, 2 / 32), (2, 8, 2 * (1 + 10 + 45) / 1024), (6, 6, 1.0),
])  # fmt: skip
def test_mcnemar_exact_by_hand(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_matches_scipy_and_does_not_overflow():
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(3, 9), (10, 21), (40, 25), (600, 489), (1089, 0), (520, 560)]:
        expected = scipy_stats.binomtest(b, b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert 0.0 < mcnemar_exact(600, 489) < 1.0


def test_holm_by_hand():
    # sorted 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, raised to 0.06 to stay monotone)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([0.02]) == [0.02]


def test_mde_by_hand():
    assert Z_MDE == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    assert mde_80(0.1, 1000) == pytest.approx(Z_MDE * 0.01)
    # the example: ~10% discordant items at n=1,089 gives about 2.7 points
    assert mde_80(0.1, 1089) == pytest.approx(0.02685, abs=1e-4)
    assert mde_80(0.0, 1089) is None


def test_percentile_ci_and_majority_by_hand():
    assert percentile_ci(np.arange(101.0)) == pytest.approx([2.5, 97.5])
    assert majority_share([0, 1, 1, 2]) == 0.5
    assert majority_share([3, 3, 3]) == 1.0


def test_summarize_three_seeds_by_hand():
    base = rows([1, 0, 1, 0], golds=[0, 1, 1, 2])
    seeds = [rows([1, 1, 0, 1]), rows([1, 1, 1, 0]), rows([0, 1, 0, 1])]  # per item 2/3, 1, 1/3, 2/3
    out = summarize({"base": [base], "sel": seeds}, "base", n_boot=4000, seed=1)
    assert out["baseline"] == "base" and out["n_items"] == 4 and out["majority_acc"] == 0.5
    b, s = out["arms"]["base"], out["arms"]["sel"]
    assert b["acc"] == 0.5 and b["delta"] is None and b["mcnemar_p"] is None and b["verdict"] == "baseline (n=4)"
    assert s["acc"] == pytest.approx(2 / 3) and s["delta"] == pytest.approx(1 / 6) and s["n_seeds"] == 3
    assert s["acc_norm"] == pytest.approx(1 / 3)  # correct_norm is the opposite of correct in `rows`
    assert s["gold_prob"] == pytest.approx(0.25 + 0.5 * 2 / 3)
    # majority vote: sel right on q0, q1, q3; base on q0, q2: b = 2 (q1, q3), c = 1 (q2)
    assert s["discordant"] == [2, 1] and s["disagreement"] == 0.75
    assert s["mcnemar_p"] == 1.0  # min(1, 2 * (C(3,0) + C(3,1)) / 2**3) = min(1, 8 / 8)
    assert s["p_holm"] == s["mcnemar_p"]  # one comparison
    assert s["mde_80"] == pytest.approx(Z_MDE * math.sqrt(0.75 / 4))
    lo, hi = s["acc_ci"]
    assert 1 / 3 <= lo < 2 / 3 < hi <= 1
    assert "no detectable difference from base at n=4" in s["verdict"]
    assert s["subjects"] == {"s": {"n_items": 4, "acc": pytest.approx(2 / 3), "delta": pytest.approx(1 / 6)}}


def test_bootstrap_of_two_items_by_hand():
    # items scored 0 and 1: a resample's mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4
    out = summarize({"a": [rows([0, 1])], "b": [rows([0, 1])]}, "a", n_boot=2000, seed=0)
    assert out["arms"]["a"]["acc_ci"] == [0.0, 1.0]
    b = out["arms"]["b"]
    assert b["delta_ci"] == [0.0, 0.0] and b["mcnemar_p"] == 1.0 and b["mde_80"] is None
    assert "right on exactly the same items" in b["verdict"]


def test_clear_difference_is_called_and_holm_applies_across_arms():
    n = 1089
    base = rows([1] * 300 + [0] * (n - 300))
    better = rows([1] * 400 + [0] * (n - 400))  # right on 100 more items, wrong on none more
    same = rows([1] * 290 + [0] * 10 + [1] * 10 + [0] * (n - 310))  # 10 each way
    out = summarize({"base": [base], "better": [better], "same": [same]}, "base", n_boot=500)
    good, flat = out["arms"]["better"], out["arms"]["same"]
    assert good["mcnemar_p"] == pytest.approx(2 / 2**100) and good["p_holm"] == pytest.approx(2 * good["mcnemar_p"])
    assert good["delta"] == pytest.approx(100 / n) and good["delta_ci"][0] > 0
    assert good["verdict"].startswith("better than base by 9.2 points at n=1,089")
    assert flat["mcnemar_p"] == 1.0 and flat["p_holm"] == 1.0 and flat["delta"] == 0.0
    assert flat["mde_80"] == pytest.approx(Z_MDE * math.sqrt(20 / n / n))
    assert flat["verdict"].startswith("no detectable difference from base at n=1,089; a difference under 1.2 points")


def test_items_are_matched_by_id():
    base = rows([1, 0, 1])
    arm = list(reversed(rows([0, 0, 1, 1])))  # another order, one extra item (q3)
    assert common_ids({"base": [base], "arm": [arm]}) == ["q0", "q1", "q2"]
    out = summarize({"base": [base], "arm": [arm]}, "base", n_boot=100)
    assert out["n_items"] == 3 and out["arms"]["arm"]["delta"] == pytest.approx(-1 / 3)
    with pytest.raises(ValueError, match="baseline arm 'x'"):
        summarize({"base": [base]}, "x")
    with pytest.raises(ValueError, match="arm 'arm' has no evaluation"):
        summarize({"base": [base], "arm": []}, "base")
    with pytest.raises(ValueError, match="share no evaluated item"):
        summarize({"base": [base], "arm": [rows([1], prefix="z")]}, "base")
