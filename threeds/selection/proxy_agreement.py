"""Would a proxy model pick what the target picks? The numbers and the verdict of `threeds proxy-check`.

Both scorings cover the same records (rows aligned by id). Each side is selected the way a run of
its own would be: its own percentiles of its own metrics (the target run's bands and attention
method) and k-center greedy on its own instruction embeddings (the run's seed). There is no quality
threshold (the run's data.jsonl holds the records Stage 1 kept), no A' flag rule and no id rules.
Statistics: `threeds.selection.agreement`.

* per metric: Spearman's rho between target and proxy, and Cohen's kappa of the band decisions
  (inside the band or not, each side at its own percentiles);
* the intersection of the three bands: kappa, and the overlap of the two sets of band survivors;
* k-center: Spearman's rho between the two pick orders over every record (records past
  `ORDER_CAP` picks share the last rank), and the overlap of the picks among the band survivors at
  `k`, a `sample_num` scaled to the sample (`scaled_k`), beside the chance line;
* the composition of the two selections by source.

The verdict (`verdict`) passes only when the gates hold at the 95% intervals' pessimistic ends:
by default rho >= 0.7 on all three metrics and the share of the target's picks that the proxy
also picks >= 3x chance. When the estimates pass but the intervals do not, the sample is too small
to say: "inconclusive", with the sample size that would be needed for rho. It never says the two are
equivalent: a sample shows agreement on that sample, within its intervals.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from threeds.config import SelectConfig
from threeds.names import METRIC_NAMES, METRICS, metric_column
from threeds.selection.agreement import Z, cohen_kappa, composition, set_overlap, spearman
from threeds.selection.apply import filter_rows, pick_rows
from threeds.selection.kcenter import band_thresholds, k_center_greedy, within

ORDER_CAP = 3000  # k-center picks ranked for the pick-order correlation (each costs a pass over the rows)
MIN_RECORDS = 30  # below this the check says nothing either way
SCALED_SHARE = 0.1  # k as a share of the sample when the pool's size is not given


@dataclass(frozen=True)
class Gates:
    """What the verdict requires, at the pessimistic end of each 95% interval."""

    min_rho: float = 0.7  # Spearman's rho of each metric
    min_vs_chance: float = 3.0  # share of the target's picks the proxy also picks, over chance


@dataclass(frozen=True)
class Side:
    """One scoring of the sample: metrics rows and embeddings in the same record order as the other side."""

    metrics: pd.DataFrame
    embeddings: np.ndarray


def scaled_k(sample_num: int, n: int, pool: int | None) -> int:
    """sample_num scaled from the pool to the n-record sample (pool given), else SCALED_SHARE of it; 1..n."""
    k = sample_num * n / pool if pool else SCALED_SHARE * n
    return int(min(n, max(1, round(k))))


def band_decisions(side: Side, config: SelectConfig) -> dict[str, np.ndarray]:
    """Per metric, True where the row lies inside that metric's band at this side's own percentiles."""
    found = {}
    for metric, (low, up) in config.bands().items():
        values = side.metrics[metric_column(metric, config.atten_method)].to_numpy(dtype=float)
        found[metric] = within(values, *band_thresholds(values, low, up))
    return found


def pick_ranks(embeddings: np.ndarray, seed: int, cap: int = ORDER_CAP) -> np.ndarray:
    """Each row's rank in the k-center pick order over all rows (1 = first); rows past `cap` share cap + 1."""
    n = len(embeddings)
    order = k_center_greedy(np.ascontiguousarray(embeddings, dtype=np.float32), min(n, cap), seed=seed)
    ranks = np.full(n, min(n, cap) + 1, dtype=float)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def compare(target: Side, proxy: Side, config: SelectConfig, k: int, sources: list[str]) -> dict:
    """Every number of the check (module docstring) for two aligned sides under the run's `config`."""
    config = dataclasses.replace(config, sample_num=k, quality_threshold=None, exclude_flags=(), include=(), exclude=())
    n = len(target.metrics)
    metrics = {}
    decided = {name: band_decisions(side, config) for name, side in (("target", target), ("proxy", proxy))}
    for metric in METRICS:
        column = metric_column(metric, config.atten_method)
        metrics[metric] = {
            "name": METRIC_NAMES[metric], "column": column,
            "spearman": spearman(target.metrics[column], proxy.metrics[column]),
            "band_kappa": cohen_kappa(decided["target"][metric], decided["proxy"][metric]),
        }  # fmt: skip
    filtered = {name: filter_rows(config, side.metrics, None) for name, side in (("target", target), ("proxy", proxy))}
    picks = {name: pick_rows(config, filtered[name], side.embeddings) for name, side in (("target", target), ("proxy", proxy))}
    ids = target.metrics["id"].astype(str).to_numpy()
    survivors = {name: np.flatnonzero(f.in_bands) for name, f in filtered.items()}
    return {
        "n": n, "k": k, "bands": {m: list(b) for m, b in config.bands().items()}, "atten_method": config.atten_method,
        "seed": config.seed, "metrics": metrics,
        "intersection": {
            "band_kappa": cohen_kappa(filtered["target"].in_bands, filtered["proxy"].in_bands),
            "overlap": set_overlap(ids[survivors["target"]], ids[survivors["proxy"]], n),
        },
        "picks": {"overlap": set_overlap(ids[picks["target"]], ids[picks["proxy"]], n),
                  "target_ids": ids[picks["target"]].tolist(), "proxy_ids": ids[picks["proxy"]].tolist()},
        "kcenter_order": {**spearman(pick_ranks(target.embeddings, config.seed), pick_ranks(proxy.embeddings, config.seed)),
                          "ranked": min(n, ORDER_CAP)},
        "composition": composition(sources, np.arange(n), picks["target"], picks["proxy"]),
    }  # fmt: skip


def rho_sample_needed(rho: float, gate: float) -> int | None:
    """Records at which a rho this large would have its interval's lower end at the gate (Bonett-Wright
    variance, module `agreement`); None when rho does not exceed the gate."""
    if rho is None or rho <= gate or rho >= 1:
        return None
    gap = math.atanh(rho) - math.atanh(gate)
    return math.ceil(3 + (1 + rho * rho / 2) * (Z / gap) ** 2)


def _gate_rows(result: dict, gates: Gates) -> list[dict]:
    """Each gate with its estimate and the interval's pessimistic end."""
    rows = []
    for metric in METRICS:
        found = result["metrics"][metric]["spearman"]
        rows.append({"gate": f"Spearman rho of {METRIC_NAMES[metric]} >= {gates.min_rho:g}", "estimate": found["rho"],
                     "low": found["ci"][0] if found["ci"] else None, "needed": gates.min_rho,
                     "records_needed": rho_sample_needed(found["rho"], gates.min_rho)})  # fmt: skip
    overlap = result["picks"]["overlap"]
    chance = overlap["chance_share"]
    ratio_low = overlap["share_ci"][0] / chance if overlap["share_ci"] and chance else None
    rows.append({"gate": f"share of the target's picks the proxy also picks >= {gates.min_vs_chance:g}x chance "
                 f"({chance:.1%})" if chance else "overlap vs chance", "estimate": overlap["vs_chance"], "low": ratio_low,
                 "needed": gates.min_vs_chance, "records_needed": None})  # fmt: skip
    for row in rows:
        row["estimate_passes"] = row["estimate"] is not None and row["estimate"] >= row["needed"]
        row["interval_passes"] = row["low"] is not None and row["low"] >= row["needed"]
    return rows


def verdict(result: dict, gates: Gates = Gates()) -> dict:
    """passes / inconclusive / fails, in words, with the gates and how each fared (module docstring)."""
    rows, n = _gate_rows(result, gates), result["n"]
    failed = [r["gate"] for r in rows if not r["estimate_passes"]]
    if n < MIN_RECORDS:
        state, words = "inconclusive", f"only {n} records: too few to judge a proxy either way; check on a few hundred"
    elif failed:
        state = "fails"
        words = (f"the proxy does not rank these {n} records like the target; {len(failed)} of {len(rows)} gates fail "
                 f"even on the estimates: {'; '.join(failed)}. "
                 "Do not score the pool with it; a selection it makes would differ from the target's.")  # fmt: skip
    elif all(r["interval_passes"] for r in rows):
        state = "passes"
        share = result["picks"]["overlap"]["share"]
        words = (f"on these {n} records the proxy ranks all three metrics like the target (every gate holds at the "
                 f"pessimistic end of its 95% interval) and picks {share:.0%} of the target's picks. Agreement on a "
                 "sample, not equivalence: a pool run with the proxy picks a similar, not the same, selection.")  # fmt: skip
    else:
        state = "inconclusive"
        needed = max((r["records_needed"] or 0 for r in rows), default=0)
        more = f"; about {needed} records would show rho's gate if rho stays as it is" if needed > n else ""
        words = f"the estimates pass the gates but the 95% intervals of {n} records are too wide to show it{more}"
    return {"verdict": state, "passed": state == "passes", "words": words, "gates": dataclasses.asdict(gates), "checks": rows}
