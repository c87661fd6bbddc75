"""A proxy check (proxy_check.json) in words and tables: the Markdown report `threeds proxy-check`
writes and the tables the app's view shows, from the same rows."""

from __future__ import annotations

from threeds.names import METRICS
from threeds.rundir.progress import duration


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _ci(ci: list[float] | None, fmt: str = ".2f") -> str:
    return "n/a" if not ci else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def agreement_rows(check: dict) -> list[dict]:
    """One row per measure: what, the estimate, its 95% interval, n, and the chance line where one applies."""
    found = check["agreement"]
    rows = []
    for metric in METRICS:
        part = found["metrics"][metric]
        rho, kappa = part["spearman"], part["band_kappa"]
        rows.append({"measure": f"{part['name']}: Spearman rho", "estimate": _num(rho["rho"]), "95% interval": _ci(rho["ci"]),
                     "n": rho["n"], "chance": "0"})  # fmt: skip
        rows.append({"measure": f"{part['name']}: band decisions, Cohen's kappa", "estimate": _num(kappa["kappa"]),
                     "95% interval": _ci(kappa["ci"]), "n": kappa["n"], "chance": "0"})  # fmt: skip
    kappa, order = found["intersection"]["band_kappa"], found["kcenter_order"]
    rows.append({"measure": "all three bands: Cohen's kappa", "estimate": _num(kappa["kappa"]), "95% interval": _ci(kappa["ci"]),
                 "n": kappa["n"], "chance": "0"})  # fmt: skip
    rows.append({"measure": f"k-center pick order: Spearman rho (first {order['ranked']} picks ranked)", "estimate": _num(order["rho"]),
                 "95% interval": _ci(order["ci"]), "n": order["n"], "chance": "0"})  # fmt: skip
    for label, overlap in (("band survivors", found["intersection"]["overlap"]), (f"k-center picks (k = {found['k']})", found["picks"]["overlap"])):
        rows.append({"measure": f"{label}: share of the target's {overlap['target']} also picked by the proxy",
                     "estimate": _num(overlap["share"], ".1%"), "95% interval": _ci(overlap["share_ci"], ".1%"), "n": overlap["target"],
                     "chance": _num(overlap["chance_share"], ".1%")})  # fmt: skip
        rows.append({"measure": f"{label}: Jaccard", "estimate": _num(overlap["jaccard"]), "95% interval": _ci(overlap.get("jaccard_ci")),
                     "n": overlap["n"], "chance": _num(overlap["chance_jaccard"])})  # fmt: skip
    return rows


def gate_rows(check: dict) -> list[dict]:
    """The verdict's gates: each with its estimate, its interval's pessimistic end and whether each passes."""
    return [
        {"gate": row["gate"], "estimate": _num(row["estimate"]), "interval's low end": _num(row["low"]),
         "estimate passes": row["estimate_passes"], "interval passes": row["interval_passes"]}
        for row in check["verdict"]["checks"]
    ]  # fmt: skip


def composition_rows(check: dict) -> list[dict]:
    """Share of each source in the sample and in the two selections, in percent, with the proxy's shift in points."""
    return [
        {"source": r["source"], "sample %": round(100 * r["sample"], 1), "target's picks %": round(100 * r["target"], 1),
         "proxy's picks %": round(100 * r["proxy"], 1), "shift (points)": round(100 * r["shift"], 1)}
        for r in check["agreement"]["composition"]["rows"]
    ]  # fmt: skip


def timing_rows(check: dict) -> list[dict]:
    """Seconds per record of each side's scoring and A', and the projection for the pool (or the sample)."""
    timing = check["timing"]
    rows = []
    for side in ("target", "proxy"):
        per = timing[f"{side}_per_record"]
        projected = timing["projected_seconds"][side]
        rows.append({"model": side, "score s/record": _num(per["score"], ".3f"), "A' s/record": _num(per["generate"], ".3f"),
                     f"projected for {timing['projected_records']:,} records": duration(projected) if projected else "n/a"})  # fmt: skip
    return rows


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(row[h]).replace("|", "/") for h in head) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(check: dict) -> str:
    """The whole check as a Markdown report."""
    target, proxy, found, decided = check["target"], check["proxy"], check["agreement"], check["verdict"]
    speedup = check["timing"]["score_speedup"]
    answers = "the target's A'" if proxy["answers"] == "target" else "its own A'"
    parts = [
        f"# Proxy check: {proxy['model']} for {target['model']}\n",
        f"**Verdict: {decided['verdict']}.** {decided['words']}\n",
        f"Target run `{target['run']}`; the proxy scored the same {found['n']} records with {answers} into `{proxy['run']}`. "
        f"Bands {found['bands']}, attention {found['atten_method']}, k-center seed {found['seed']}, k = {found['k']} "
        f"(the run's sample_num {check['sample_num']} scaled to the sample"
        + (f" of a pool of {check['pool_size']:,}" if check["pool_size"] else ", no pool size given: 10% of the sample") + ").\n",
        "## Gates (at the pessimistic end of each 95% interval)\n", _table(gate_rows(check)),
        "## Agreement\n",
        "Spearman: Fisher z with the Bonett-Wright variance; kappa: Cohen's large-sample standard error; shares: "
        "Wilson intervals (Jaccard's mapped from the share); chance: two random selections of the same sizes.\n",
        _table(agreement_rows(check)),
        f"## Composition of the selections by source (total variation {found['composition']['total_variation']:.1%})\n",
        _table(composition_rows(check)),
        "## Time\n", _table(timing_rows(check)),
        (f"The proxy scores {speedup:.2f}x as fast per record as the target did. " if speedup else "")
        + "Times come from each run's manifest, measured when it ran (load and hardware may differ).\n",
    ]  # fmt: skip
    return "\n".join(parts)
