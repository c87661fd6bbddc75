"""How far two scorings of the same records agree: the statistics of the proxy check (issue 33).

Every estimate comes with a 95% interval, computed in closed form so a hand calculation checks it:

* Spearman's rho: Pearson's r of the average ranks (ties share their mean rank), pairs where
  either value is not finite left out. Interval: Fisher's z with Bonett & Wright's (2000) variance
  for Spearman, var(z) = (1 + rho^2 / 2) / (n - 3), so [tanh(z - 1.96 sd), tanh(z + 1.96 sd)];
  none below n = 4.
* Cohen's kappa of two yes/no decisions: (p_o - p_e) / (1 - p_e), p_o the share where they agree,
  p_e the agreement expected from their marginals. Interval: kappa +- 1.96 se with Cohen's (1960)
  large-sample se = sqrt(p_o (1 - p_o) / (n (1 - p_e)^2)), clipped to [-1, 1].
* Overlap of two selected sets A (the target's, k_A ids) and B (the proxy's, k_B) among N: the
  share of A also in B, x / k_A, with Wilson's score interval; Jaccard x / (k_A + k_B - x), whose
  interval is the share's mapped through that (increasing) function of x. Chance: two random
  selections of k_A and k_B from N share k_B / N of A's ids on average, Jaccard
  (k_A k_B / N) / (k_A + k_B - k_A k_B / N).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import pandas as pd

LEVEL = 0.95
Z = NormalDist().inv_cdf(0.5 + LEVEL / 2)  # 1.95996...


def _interval(low: float, high: float) -> list[float]:
    return [float(low), float(high)]


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """rho, its 95% interval (module docstring) and n, over the pairs where both are finite."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    n = int(keep.sum())
    if n < 2:
        return {"rho": None, "ci": None, "n": n}
    rx, ry = (pd.Series(v[keep]).rank(method="average").to_numpy() for v in (x, y))
    if rx.std() == 0 or ry.std() == 0:
        return {"rho": None, "ci": None, "n": n}  # a constant column has no ranking to agree with
    rho = float(np.corrcoef(rx, ry)[0, 1])
    return {"rho": rho, "ci": fisher_interval(rho, n), "n": n}


def fisher_interval(rho: float, n: int) -> list[float] | None:
    """Fisher-z interval of a Spearman rho with Bonett & Wright's variance; None below n = 4."""
    if n < 4:
        return None
    r = min(max(rho, -1 + 1e-12), 1 - 1e-12)
    z, sd = math.atanh(r), math.sqrt((1 + r * r / 2) / (n - 3))
    return _interval(math.tanh(z - Z * sd), math.tanh(z + Z * sd))


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Kappa of two yes/no decisions on the same n items, its interval, p_o, p_e and n."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = len(a)
    if n == 0:
        return {"kappa": None, "ci": None, "p_o": None, "p_e": None, "n": 0}
    p_o = float((a == b).mean())
    pa, pb = float(a.mean()), float(b.mean())
    p_e = pa * pb + (1 - pa) * (1 - pb)
    if p_e == 1:  # both say the same for every item: agreement beyond chance is undefined
        return {"kappa": None, "ci": None, "p_o": p_o, "p_e": p_e, "n": n}
    kappa = (p_o - p_e) / (1 - p_e)
    se = math.sqrt(p_o * (1 - p_o) / n) / (1 - p_e)
    return {"kappa": kappa, "ci": _interval(max(-1.0, kappa - Z * se), min(1.0, kappa + Z * se)), "p_o": p_o, "p_e": p_e, "n": n}


def wilson(x: int, n: int) -> list[float] | None:
    """Wilson's 95% score interval of the proportion x / n; None for n = 0."""
    if n == 0:
        return None
    p, z2 = x / n, Z * Z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return _interval(0.0 if x == 0 else max(0.0, centre - half), 1.0 if x == n else min(1.0, centre + half))


def set_overlap(target: Sequence[str], proxy: Sequence[str], n: int) -> dict:
    """Overlap of the target's and the proxy's selected ids among n records, beside chance (module docstring)."""
    k_a, k_b = len(set(target)), len(set(proxy))
    x = len(set(target) & set(proxy))
    union = k_a + k_b - x
    share = x / k_a if k_a else None
    chance_share = k_b / n if n else None
    expected = k_a * k_b / n if n else 0.0
    found = {
        "n": n, "target": k_a, "proxy": k_b, "both": x,
        "jaccard": x / union if union else None,
        "share": share, "share_ci": wilson(x, k_a),
        "chance_share": chance_share,
        "chance_jaccard": expected / (k_a + k_b - expected) if k_a + k_b - expected > 0 else None,
        "vs_chance": share / chance_share if share is not None and chance_share else None,
    }  # fmt: skip
    ci = found["share_ci"]
    if ci is not None:
        found["jaccard_ci"] = [c * k_a / (k_a + k_b - c * k_a) if k_a + k_b - c * k_a > 0 else 1.0 for c in ci]
    return found


def composition(sources: Sequence[str], sample: np.ndarray, target: np.ndarray, proxy: np.ndarray) -> dict:
    """Share of each source among the sample's rows and the two selections' rows, the proxy's shift
    from the target in points, and the total variation distance between the two selections."""
    sources = np.asarray(sources, dtype=object)

    def shares(rows: np.ndarray) -> dict[str, float]:
        counts = Counter(sources[rows].tolist())
        return {s: counts.get(s, 0) / len(rows) if len(rows) else 0.0 for s in names}

    names = sorted(set(sources[sample].tolist()) | set(sources[target].tolist()) | set(sources[proxy].tolist()))
    base, a, b = shares(sample), shares(target), shares(proxy)
    rows = [{"source": s, "sample": base[s], "target": a[s], "proxy": b[s], "shift": b[s] - a[s]} for s in names]
    return {"rows": rows, "total_variation": 0.5 * sum(abs(r["shift"]) for r in rows)}
