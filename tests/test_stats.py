"""threeds.outcomes.stats against hand computations on tiny inputs (and scipy where installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from threeds.outcomes.stats import (
    common_ids,
    holm,
    items_for_power,
    majority_share,
    mcnemar_exact,
    min_callable,
    newcombe_paired,
    percentile_ci,
    summarize,
    wilson,
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


def test_min_callable_is_what_the_exact_test_can_call():
    # the figures: p(5, 0) = 2/32 = 0.0625, p(6, 0) = 2/64 = 0.031, p(7, 0) = 0.0156
    assert mcnemar_exact(5, 0) == 0.0625 and mcnemar_exact(6, 0) == pytest.approx(0.03125)
    assert min_callable(100) == 0.06 and min_callable(100, family=2) == 0.07  # 0.031 is not < 0.025
    assert min_callable(1089) == pytest.approx(6 / 1089)
    assert min_callable(5) is None and min_callable(6) == 1.0  # 5 items: even 5 of 5 gives p = 0.0625
    # by brute force: no table of n <= 40 items reaches p < 5% / m with |b - c| under k_min
    for m in (1, 2, 3):
        for n in range(1, 41):
            k_min = round(min_callable(n, m) * n) if min_callable(n, m) else n + 1
            called = [abs(b - c) for b in range(n + 1) for c in range(n + 1 - b) if mcnemar_exact(b, c) < 0.05 / m]
            assert min(called, default=n + 1) == k_min


def test_wilson_and_newcombe_by_hand():
    z = 1.959964
    lo, hi = wilson(0, 10, z)  # x = 0: [0, z^2 / (n + z^2)]
    assert lo == 0.0 and hi == pytest.approx(z * z / (10 + z * z))
    lo, hi = wilson(5, 10, z)  # symmetric about 1/2: half-width z sqrt(2.5 + z^2/4) / (10 + z^2)
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - 0.5 == pytest.approx(z * math.sqrt(2.5 + z * z / 4) / (10 + z * z))
    # a = d = 0, b = c = 5: phi's margins are (5, 5, 5, 5), ad - bc = -25 < 0 so phi = -25 / 25 = -1,
    # and the half-widths are (p1 - l1) + (u2 - p2) = 2 (hi - 0.5)
    half = 2 * (hi - 0.5)
    assert newcombe_paired(0, 5, 5, 0) == pytest.approx([-half, half])


@pytest.mark.parametrize(("table", "expected"), [
    ((20, 12, 2, 16), (0.0562, 0.3292)),  # Newcombe 1998 (Stat Med 17:2635), Table II, method 10
    ((1, 1, 7, 12), (-0.5069, -0.0256)),  # Fagerland, Lydersen & Laake 2014 (Bentur et al. 2009): -0.507 to -0.026
    ((59, 6, 16, 80), (-0.1186, -0.0046)),  # Fagerland et al. 2017, chapter 8 (Cavo et al. 2012)
    ((8, 3, 1, 2), (-0.1574, 0.4136)),  # Tang, Ling & Tian 2010's example
])  # fmt: skip
def test_newcombe_matches_published_examples(table, expected):
    assert newcombe_paired(*table) == pytest.approx(list(expected), abs=1e-4)


def test_newcombe_does_not_collapse_at_small_discordance():
    lo, hi = newcombe_paired(40, 1, 0, 59)  # one discordant item of 100, favouring the arm
    assert lo < 0 < 0.01 < hi  # a bootstrap over items gives [0, 0.03]: it cannot go negative
    lo, hi = newcombe_paired(40, 0, 0, 60)  # none discordant: still a width of a few points
    assert lo == pytest.approx(-hi) and 0.015 < hi < 0.03
    # four one-way discordant items: p = 0.125, and the interval includes 0 (the bootstrap's did not)
    assert mcnemar_exact(4, 0) == 0.125 and newcombe_paired(40, 4, 0, 56)[0] < 0


def _exact_power(n: int, share: float, delta: float, alpha: float) -> float:
    """Power of the exact McNemar test at level alpha: D ~ Bin(n, share) discordant items, of which
    b ~ Bin(D, q), q = (share + delta) / (2 share), favour the arm; it rejects when min(b, D - b) <= k_D,
    k_D the largest k with 2 P(Bin(D, 1/2) <= k) < alpha."""
    q, total = (share + delta) / (2 * share), 0.0
    for d in range(1, n + 1):
        k, tail = -1, 0
        while k + 1 <= d and 2 * (tail + math.comb(d, k + 1)) < alpha * 2**d:
            k, tail = k + 1, tail + math.comb(d, k + 1)
        reject = set(range(k + 1)) | set(range(d - k, d + 1)) if k >= 0 else set()
        given = sum(math.comb(d, b) * q**b * (1 - q) ** (d - b) for b in reject)
        total += math.comb(n, d) * share**d * (1 - share) ** (n - d) * given
    return total


def test_items_for_power_by_hand_and_by_exact_power():
    # Connor: (1.959964 sqrt(0.2) + 0.841621 sqrt(0.2 - 0.0025))^2 / 0.0025 = 625.5 -> 626
    root = 1.959964 * math.sqrt(0.2) + 0.841621 * math.sqrt(0.1975)
    assert items_for_power(0.05, 0.2) == math.ceil(root**2 / 0.0025) == 626
    assert items_for_power(0.05, 0.2, family=2) > 626  # alpha 2.5%
    # (1.959964 sqrt(0.3) + 0.841621 sqrt(0.29))^2 / 0.01 = (1.07352 + 0.45323)^2 / 0.01 = 233.1 -> 234
    assert items_for_power(0.10, 0.3) == 234
    # the exact test's power at the planned n is close to 80% (the formula is a normal approximation)
    assert 0.75 < _exact_power(items_for_power(0.10, 0.3), 0.3, 0.10, 0.05) < 0.85
    with pytest.raises(ValueError, match="discordant share"):
        items_for_power(0.3, 0.2)


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
    assert s["discordant"] == [2, 1] and s["disagreement"] == 0.75 and s["table"] == [1, 2, 1, 0]
    assert s["differ"] == "3 of 4 items differ: 2 right only here, 1 only for base"
    assert s["mcnemar_p"] == 1.0  # min(1, 2 * (C(3,0) + C(3,1)) / 2**3) = min(1, 8 / 8)
    assert s["p_holm"] == s["mcnemar_p"]  # one comparison
    assert s["delta_ci"] == newcombe_paired(1, 2, 1, 0)
    assert s["min_callable"] is None and out["min_callable"] is None  # 4 items: p >= 2/16 whatever happens
    lo, hi = s["acc_ci"]
    assert 1 / 3 <= lo < 2 / 3 < hi <= 1
    assert s["verdict"] == ("no detectable difference from base at n=4 (observed +16.7, 95% CI "
                            f"{100 * s['delta_ci'][0]:+.1f} to {100 * s['delta_ci'][1]:+.1f}; 3 of 4 items differ: 2 right "
                            "only here, 1 only for base); no difference at all can be called with 4 items")  # fmt: skip
    assert out["plan"] == {"delta": 0.05, "discordant_share": 0.2, "power": 0.8, "alpha": 0.05, "n_items": 626}
    assert s["subjects"] == {"s": {"n_items": 4, "acc": pytest.approx(2 / 3), "delta": pytest.approx(1 / 6)}}


def test_bootstrap_of_two_items_by_hand():
    # items scored 0 and 1: a resample's mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4
    out = summarize({"a": [rows([0, 1])], "b": [rows([0, 1])]}, "a", n_boot=2000, seed=0)
    assert out["arms"]["a"]["acc_ci"] == [0.0, 1.0]
    b = out["arms"]["b"]
    assert b["delta_ci"] == newcombe_paired(1, 0, 0, 1) and b["delta_ci"][0] < 0 < b["delta_ci"][1]
    assert b["mcnemar_p"] == 1.0 and b["differ"] == "0 of 2 items differ"
    assert "right on exactly the same items" in b["verdict"]


def test_clear_difference_is_called_and_holm_applies_across_arms():
    n = 1089
    base = rows([1] * 300 + [0] * (n - 300))
    better = rows([1] * 400 + [0] * (n - 400))  # right on 100 more items, wrong on none more
    same = rows([1] * 290 + [0] * 10 + [1] * 10 + [0] * (n - 310))  # 10 each way
    out = summarize({"base": [base], "better": [better], "same": [same]}, "base", n_boot=500)
    good, flat = out["arms"]["better"], out["arms"]["same"]
    assert good["mcnemar_p"] == pytest.approx(2 / 2**100) and good["p_holm"] == pytest.approx(2 * good["mcnemar_p"])
    assert good["delta"] == pytest.approx(100 / n) and good["delta_ci"] == newcombe_paired(300, 100, 0, n - 400)
    assert good["delta_ci"][0] > 0
    assert good["verdict"].startswith("better than base by 9.2 points at n=1,089")
    assert good["verdict"].endswith("100 of 1,089 items differ: 100 right only here, 0 only for base)")
    assert flat["mcnemar_p"] == 1.0 and flat["p_holm"] == 1.0 and flat["delta"] == 0.0
    assert out["comparisons"] == 2 and flat["min_callable"] == pytest.approx(7 / n)  # p(7, 0) = 0.0156 < 0.025
    assert flat["verdict"].startswith("no detectable difference from base at n=1,089 (observed +0.0")
    assert flat["verdict"].endswith("20 of 1,089 items differ: 10 right only here, 10 only for base); "
                                    "no difference under 0.6 points can be called with 1,089 items")


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
