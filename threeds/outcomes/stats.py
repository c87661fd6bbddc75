"""Is arm A better than the baseline on this set, and how sure are we? Paired statistics over items.

Input: per arm, one list of items.jsonl rows per training seed. Items are matched by id (the ids
every arm and seed has; `n_items` says how many), and each arm's seeds are averaged per item first:
an item's score is the share of seeds that got it right (0 or 1 with one seed). Then:

* `acc`, `acc_norm`, `gold_prob`: means over items; `acc_ci`: 95% percentile bootstrap over items
  (`n_boot` resamples of the items with replacement, `seed`).
* The paired table: an item counts as right for an arm when more than half of its seeds got it
  right (majority vote; a tie, possible with an even number of seeds, counts as wrong, so use an
  odd number of seeds). `table` = [a, b, c, d]: right for both, for the arm only, for the baseline
  only, for neither; `discordant` = [b, c]; `disagreement` = (b + c) / n; `differ`: "k of n items
  differ" in words.
* `delta`: acc(arm) - acc(baseline) (the seed-averaged scores; (b - c) / n with one seed).
* `delta_ci`: Newcombe's interval for a difference of paired proportions (Stat Med 1998; 17:2635,
  method 10): the Wilson score intervals of the two accuracies combined by "square and add", with
  the correlation of the pair corrected as Newcombe does (`newcombe_paired`). Unlike a bootstrap
  over the items it does not shrink to a point when few items are discordant: of 100 items, 40
  right for both and one for the arm only gives -1.8 to +3.8 points; none discordant, -2.1 to
  +2.1. It is built around the vote difference (b - c) / n.
* `mcnemar_p`: exact McNemar test, i.e. the two-sided binomial test (p = 1/2) on the discordant
  items: p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2), and 1 when b + c = 0.
* `p_holm`: Holm's step-down correction over the non-baseline arms (family-wise error 5%).
* `min_callable`: the smallest difference this test could call at all with n items and this Holm
  family, whatever the data: the first step of Holm compares the smallest p with 5% / m, and for a
  difference of k items p is smallest when every discordant item favours one arm, p = 2 / 2^k. So
  no difference under k_min / n can be called (k_min = 6 at m = 1, 7 at m = 2: 6 and 7 points with
  100 items). None when even n items could not be called.
* `plan`: a planning figure, not a property of this data: the items needed for 80% power to detect
  `PLAN_DELTA` at level 5% / m if `PLAN_DISCORDANT` of the items are discordant (an assumption,
  stated with the figure), by Connor's formula for McNemar's test (Biometrics 1987; 43:207):
  n = (z_{1-a/2} sqrt(p_d) + z_{power} sqrt(p_d - delta^2))^2 / delta^2 (626 items for 5 points at
  20%). The exact test is a little more conservative: its power at that n is about 78%.
* `verdict`: words that claim only what the test shows: "better"/"worse" only when Holm's p < 5%
  and the interval excludes 0, else "no detectable difference", with the smallest callable
  difference and how many items differ.
* `subjects`: per subject, n, accuracy and its difference from the baseline (no test: too few items).
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

import numpy as np

ALPHA = 0.05
POWER = 0.80
PLAN_DELTA = 0.05  # the target difference of the planning figure: 5 points
PLAN_DISCORDANT = 0.20  # its assumed discordant share: one item in five answered right by only one arm


def summarize(evals: dict[str, list[list[dict]]], baseline: str, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """The experiment's comparison table (module docstring), as summary.json holds it."""
    if baseline not in evals:
        raise ValueError(f"baseline arm {baseline!r} is not among the arms {sorted(evals)}")
    empty = [arm for arm, runs in evals.items() if not runs]
    if empty:
        raise ValueError(f"arm {empty[0]!r} has no evaluation")
    ids = common_ids(evals)
    if not ids:
        raise ValueError("the arms share no evaluated item")
    scores = {arm: _item_scores(runs, ids) for arm, runs in evals.items()}
    boot = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    base = scores[baseline]
    others = [arm for arm in scores if arm != baseline]
    family = max(1, len(others))
    arms = {arm: _arm_stats(s, base, boot, arm == baseline, baseline, family) for arm, s in scores.items()}
    for arm, p in zip(others, holm([arms[arm]["mcnemar_p"] for arm in others])):
        arms[arm]["p_holm"] = p
    for arm, stats in arms.items():
        stats["verdict"] = verdict(stats, baseline, is_baseline=arm == baseline)
    first = _by_id(evals[baseline][0])
    golds = [first[i]["gold"] for i in ids]
    return {"baseline": baseline, "n_items": len(ids), "majority_acc": majority_share(golds), "comparisons": family,
            "min_callable": min_callable(len(ids), family), "plan": plan(family), "arms": arms}  # fmt: skip


def common_ids(evals: dict[str, list[list[dict]]]) -> list[str]:
    """Ids every arm and seed evaluated, in the order of the first run listed."""
    runs = [run for seeds in evals.values() for run in seeds]
    if not runs:
        return []
    shared = set.intersection(*({row["id"] for row in run} for run in runs))
    return [row["id"] for row in runs[0] if row["id"] in shared]


def _by_id(rows: list[dict]) -> dict[str, dict]:
    return {row["id"]: row for row in rows}


def _item_scores(runs: list[list[dict]], ids: list[str]) -> dict[str, np.ndarray]:
    """Per item, averaged over seeds: correct, correct_norm, gold_prob; plus the majority vote."""
    tables = [_by_id(run) for run in runs]

    def mean(key: str) -> np.ndarray:
        return np.array([[float(t[i][key]) for i in ids] for t in tables]).mean(0)

    correct = mean("correct")
    return {"correct": correct, "correct_norm": mean("correct_norm"), "gold_prob": mean("gold_prob"),
            "vote": correct > 0.5, "n_seeds": len(runs),
            "subjects": np.array([tables[0][i].get("subject", "") for i in ids])}  # fmt: skip


def _arm_stats(arm: dict, base: dict, boot: np.ndarray, is_baseline: bool, baseline: str, family: int) -> dict:
    n = len(arm["correct"])
    stats = {
        "n_items": n, "n_seeds": arm["n_seeds"], "acc": float(arm["correct"].mean()),
        "acc_ci": percentile_ci(arm["correct"][boot].mean(1)), "acc_norm": float(arm["correct_norm"].mean()),
        "gold_prob": float(arm["gold_prob"].mean()), "subjects": _subjects(arm, base),
        "delta": None, "delta_ci": None, "mcnemar_p": None, "p_holm": None, "disagreement": None,
        "min_callable": min_callable(n, family),
    }  # fmt: skip
    if is_baseline:
        return stats
    a = int((arm["vote"] & base["vote"]).sum())
    b = int((arm["vote"] & ~base["vote"]).sum())
    c = int((~arm["vote"] & base["vote"]).sum())
    d = n - a - b - c
    stats.update(delta=float((arm["correct"] - base["correct"]).mean()), delta_ci=newcombe_paired(a, b, c, d),
                 mcnemar_p=mcnemar_exact(b, c), disagreement=(b + c) / n, discordant=[b, c], table=[a, b, c, d],
                 differ=differ_text(b, c, n, baseline))  # fmt: skip
    return stats


def _subjects(arm: dict, base: dict) -> dict[str, dict]:
    out = {}
    for subject in sorted(set(arm["subjects"].tolist())):
        pick = arm["subjects"] == subject
        acc = float(arm["correct"][pick].mean())
        out[subject] = {"n_items": int(pick.sum()), "acc": acc, "delta": acc - float(base["correct"][pick].mean())}
    return out


def differ_text(b: int, c: int, n: int, baseline: str) -> str:
    """'3 of 100 items differ: 2 right only here, 1 only for rand'."""
    if b + c == 0:
        return f"0 of {n:,} items differ"
    return f"{b + c:,} of {n:,} items differ: {b:,} right only here, {c:,} only for {baseline}"


def percentile_ci(values: np.ndarray, level: float = 1 - ALPHA) -> list[float]:
    """[lo, hi]: the (1-level)/2 and (1+level)/2 percentiles of bootstrap statistics."""
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


def wilson(x: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's score interval for x successes in n."""
    centre, half = x + z * z / 2, z * math.sqrt(x * (n - x) / n + z * z / 4)
    return (centre - half) / (n + z * z), (centre + half) / (n + z * z)


def newcombe_paired(a: int, b: int, c: int, d: int, level: float = 1 - ALPHA) -> list[float]:
    """Newcombe's method 10 interval for p1 - p2 = (b - c) / n from a paired table (a: both right,
    b: only the first, c: only the second, d: neither): square-and-add of the Wilson intervals of
    p1 = (a + b) / n and p2 = (a + c) / n, with the phi correlation corrected as Newcombe does (shrunk by
    n / 2 when positive, 0 when a margin is empty)."""
    n = a + b + c + d
    z = NormalDist().inv_cdf((1 + level) / 2)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    phi = 0.0 if margins == 0 else (max(cross - n / 2, 0.0) if cross > 0 else cross) / math.sqrt(margins)
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return [max(-1.0, p1 - p2 - lower), min(1.0, p1 - p2 + upper)]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2), in exact
    rational arithmetic (no overflow or underflow for any n)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the i-th smallest times (m - i), made
    non-decreasing, capped at 1."""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def min_callable(n: int, family: int = 1) -> float | None:
    """The smallest difference (a share of the n items) the exact McNemar test could call at 5% / family:
    k_min / n, k_min the least k with p(k, 0) = 2 / 2^k < 5% / family; None when k_min > n."""
    k = 1
    while k <= n and mcnemar_exact(k, 0) >= ALPHA / family:
        k += 1
    return k / n if k <= n else None


def items_for_power(delta: float, discordant_share: float, family: int = 1, power: float = POWER) -> int:
    """Items McNemar's test needs to detect `delta` with `power` at 5% / family if `discordant_share`
    of the items are discordant (Connor 1987); the share must be at least `delta`."""
    if not 0 < delta <= discordant_share <= 1:
        raise ValueError(f"need 0 < delta ({delta}) <= discordant share ({discordant_share}) <= 1")
    z_alpha, z_power = NormalDist().inv_cdf(1 - ALPHA / family / 2), NormalDist().inv_cdf(power)
    root = z_alpha * math.sqrt(discordant_share) + z_power * math.sqrt(discordant_share - delta**2)
    return math.ceil(root**2 / delta**2)


def plan(family: int) -> dict:
    """The planning figure for this Holm family at the stated assumptions (module docstring)."""
    return {"delta": PLAN_DELTA, "discordant_share": PLAN_DISCORDANT, "power": POWER, "alpha": ALPHA / family,
            "n_items": items_for_power(PLAN_DELTA, PLAN_DISCORDANT, family)}  # fmt: skip


def majority_share(golds: list[int]) -> float:
    """Accuracy of always giving the most common gold answer position."""
    counts = np.bincount(np.asarray(golds, dtype=int))
    return float(counts.max() / len(golds))


def callable_text(share: float | None, n: int) -> str:
    """'no difference under 6.0 points can be called with 100 items'."""
    if share is None:
        return f"no difference at all can be called with {n:,} items"
    return f"no difference under {100 * share:.1f} points can be called with {n:,} items"


def verdict(stats: dict, baseline: str, *, is_baseline: bool = False) -> str:
    """One sentence: better/worse only when Holm's p < 5% and the interval excludes 0; otherwise
    no detectable difference, with what the test could have called; always how many items differ."""
    n = f"n={stats['n_items']:,}"
    if is_baseline:
        return f"baseline ({n})"
    b, c = stats["discordant"]
    if b + c == 0:
        return f"right on exactly the same items as {baseline} at {n}: nothing to tell them apart"
    delta, (lo, hi) = stats["delta"] * 100, (v * 100 for v in stats["delta_ci"])
    ci = f"95% CI {lo:+.1f} to {hi:+.1f}"
    if stats["p_holm"] < ALPHA and (lo > 0 or hi < 0):
        word = "better" if delta > 0 else "worse"
        return (f"{word} than {baseline} by {abs(delta):.1f} points at {n} ({ci}; Holm p = {stats['p_holm']:.2g}; "
                f"{stats['differ']})")  # fmt: skip
    return (f"no detectable difference from {baseline} at {n} (observed {delta:+.1f}, {ci}; {stats['differ']}); "
            f"{callable_text(stats['min_callable'], stats['n_items'])}")  # fmt: skip
