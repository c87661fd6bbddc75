"""Is arm A better than the baseline on this set, and how sure are we? Paired statistics over items.

Input: per arm, one list of items.jsonl rows per training seed. Items are matched by id (the ids
every arm and seed has; `n_items` says how many), and each arm's seeds are averaged per item first:
an item's score is the share of seeds that got it right (0 or 1 with one seed). Then:

* `acc`, `acc_norm`, `gold_prob`: means over items; `acc_ci`: 95% percentile bootstrap over items
  (`n_boot` resamples of the items with replacement, `seed`); the same resamples serve every arm.
* `delta`: acc(arm) - acc(baseline); `delta_ci`: paired bootstrap (the per-item differences
  resampled), so the items' shared difficulty cancels.
* `mcnemar_p`: exact McNemar test, i.e. the two-sided binomial test (p = 1/2) on the discordant
  items. With several seeds an item counts as right for an arm when more than half of its seeds
  got it right (majority vote; a tie, possible with an even number of seeds, counts as wrong, so
  use an odd number of seeds). b = right for the arm only, c = right for the baseline only,
  p = min(1, 2 P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2), and 1 when b + c = 0.
* `p_holm`: Holm's step-down correction over the non-baseline arms (family-wise error 5%).
* `disagreement`: the discordant share (b + c) / n: how often the two are right on different items
  (`discordant`: [b, c]).
* `mde_80`: the smallest true difference in accuracy this McNemar test would detect with 80% power
  at the 5% level, for this n and this discordant share p_d (normal approximation, small-difference
  form): mde = (z_0.975 + z_0.80) * sqrt(p_d / n) = 2.80 * sqrt(p_d / n). None when p_d = 0.
* `verdict`: words that claim only what the test shows: "better"/"worse" only when Holm's p < 5%
  and the paired CI excludes 0, else "no detectable difference ... under <mde_80> points would
  likely go unseen".
* `subjects`: per subject, n, accuracy and its difference from the baseline (no test: too few items).
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

import numpy as np

ALPHA = 0.05
POWER = 0.80
Z_MDE = NormalDist().inv_cdf(1 - ALPHA / 2) + NormalDist().inv_cdf(POWER)  # 1.960 + 0.842 = 2.802


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
    arms = {arm: _arm_stats(s, base, boot, arm == baseline) for arm, s in scores.items()}
    others = [arm for arm in arms if arm != baseline]
    for arm, p in zip(others, holm([arms[arm]["mcnemar_p"] for arm in others])):
        arms[arm]["p_holm"] = p
    for arm, stats in arms.items():
        stats["verdict"] = verdict(stats, baseline, is_baseline=arm == baseline)
    first = _by_id(evals[baseline][0])
    golds = [first[i]["gold"] for i in ids]
    return {"baseline": baseline, "n_items": len(ids), "majority_acc": majority_share(golds), "arms": arms}


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


def _arm_stats(arm: dict, base: dict, boot: np.ndarray, is_baseline: bool) -> dict:
    n = len(arm["correct"])
    stats = {
        "n_items": n, "n_seeds": arm["n_seeds"], "acc": float(arm["correct"].mean()),
        "acc_ci": percentile_ci(arm["correct"][boot].mean(1)), "acc_norm": float(arm["correct_norm"].mean()),
        "gold_prob": float(arm["gold_prob"].mean()), "subjects": _subjects(arm, base),
        "delta": None, "delta_ci": None, "mcnemar_p": None, "p_holm": None, "disagreement": None, "mde_80": None,
    }  # fmt: skip
    if is_baseline:
        return stats
    diff = arm["correct"] - base["correct"]
    b = int((arm["vote"] & ~base["vote"]).sum())
    c = int((~arm["vote"] & base["vote"]).sum())
    stats.update(delta=float(diff.mean()), delta_ci=percentile_ci(diff[boot].mean(1)), mcnemar_p=mcnemar_exact(b, c),
                 disagreement=(b + c) / n, mde_80=mde_80((b + c) / n, n), discordant=[b, c])  # fmt: skip
    return stats


def _subjects(arm: dict, base: dict) -> dict[str, dict]:
    out = {}
    for subject in sorted(set(arm["subjects"].tolist())):
        pick = arm["subjects"] == subject
        acc = float(arm["correct"][pick].mean())
        out[subject] = {"n_items": int(pick.sum()), "acc": acc, "delta": acc - float(base["correct"][pick].mean())}
    return out


def percentile_ci(values: np.ndarray, level: float = 1 - ALPHA) -> list[float]:
    """[lo, hi]: the (1-level)/2 and (1+level)/2 percentiles of bootstrap statistics."""
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


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


def mde_80(discordant_share: float, n: int) -> float | None:
    """Minimum detectable difference at 80% power, 5% two-sided: 2.80 * sqrt(p_d / n)."""
    if discordant_share <= 0 or n <= 0:
        return None
    return Z_MDE * math.sqrt(discordant_share / n)


def majority_share(golds: list[int]) -> float:
    """Accuracy of always giving the most common gold answer position."""
    counts = np.bincount(np.asarray(golds, dtype=int))
    return float(counts.max() / len(golds))


def verdict(stats: dict, baseline: str, *, is_baseline: bool = False) -> str:
    """One sentence: better/worse only when Holm's p < 5% and the paired CI excludes 0; otherwise
    what difference could have gone unseen."""
    n = f"n={stats['n_items']:,}"
    if is_baseline:
        return f"baseline ({n})"
    if stats["mde_80"] is None:
        return f"right on exactly the same items as {baseline} at {n}: nothing to tell them apart"
    delta, (lo, hi) = stats["delta"] * 100, (v * 100 for v in stats["delta_ci"])
    ci = f"95% CI {lo:+.1f} to {hi:+.1f}"
    if stats["p_holm"] < ALPHA and (lo > 0 or hi < 0):
        word = "better" if delta > 0 else "worse"
        return f"{word} than {baseline} by {abs(delta):.1f} points at {n} ({ci}; Holm p = {stats['p_holm']:.2g})"
    return (f"no detectable difference from {baseline} at {n}; a difference under {stats['mde_80'] * 100:.1f} "
            f"points would likely go unseen (observed {delta:+.1f}, {ci})")  # fmt: skip
