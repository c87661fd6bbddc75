"""A stratified sample of a pool: the records a target run scores to anchor a proxy check (issue 33).

Strata are the values of one field (default `source`; a record without it, or with a value that is
not text or a number, is in the stratum "(none)"), optionally crossed with `length_bins` bins of the
record's length (characters of the user turn plus the answer, cut at the pool's quantiles
1/B, ..., (B-1)/B, so the bins hold about equal shares of the pool). Each stratum gets its
proportional share of n by the largest-remainder rule: floor(n N_h / N), then one more for the
strata with the largest remainders (ties: strata in sorted order) until n is reached. Within a
stratum the records are drawn at random with `random.Random(f"{seed}:{stratum}")`, so a stratum's
draw does not depend on the others. The sample keeps the pool's order.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from threeds.errors import SettingsError
from threeds.io.data import full_instruction

NONE = "(none)"


def stratum_value(record: dict, field: str) -> str:
    value = record.get(field)
    return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value) else NONE


def length_bin_of(records: Sequence[dict], bins: int) -> list[int]:
    """Per record, its length bin 0..bins-1 among the pool (module docstring)."""
    lengths = np.array([len(full_instruction(r)) + len(str(r.get("output", ""))) for r in records], dtype=float)
    if bins <= 1 or not len(lengths):
        return [0] * len(records)
    edges = np.quantile(lengths, [i / bins for i in range(1, bins)])
    return np.searchsorted(edges, lengths, side="right").tolist()


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """n seats shared among strata of these sizes in proportion, by largest remainder."""
    total = sum(sizes.values())
    quotas = {key: n * size / total for key, size in sizes.items()}
    seats = {key: math.floor(q) for key, q in quotas.items()}
    left = n - sum(seats.values())
    for key in sorted(sizes, key=lambda k: (-(quotas[k] - seats[k]), k))[:left]:
        seats[key] += 1
    return seats


def stratified_sample(records: Sequence[dict], n: int, by: str = "source", length_bins: int = 0,
                      seed: int = 0) -> tuple[list[dict], dict]:  # fmt: skip
    """n records stratified as the module docstring says, in pool order, and a report of the strata
    (pool size and records drawn per stratum)."""
    if n < 1:
        raise SettingsError(f"sample size {n}: must be at least 1")
    if length_bins < 0:
        raise SettingsError(f"length bins {length_bins}: must be at least 0")
    bins = length_bin_of(records, length_bins)
    members: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        key = stratum_value(record, by)
        members[f"{key} | length {bins[i] + 1}/{length_bins}" if length_bins > 1 else key].append(i)
    seats = allocate({k: len(v) for k, v in members.items()}, min(n, len(records)))
    chosen = sorted(i for key, rows in members.items() for i in random.Random(f"{seed}:{key}").sample(rows, seats[key]))
    strata = [{"stratum": key, "pool": len(members[key]), "drawn": seats[key]} for key in sorted(members)]
    report = {"pool": len(records), "n": len(chosen), "by": by, "length_bins": length_bins, "seed": seed, "strata": strata}
    return [records[i] for i in chosen], report
