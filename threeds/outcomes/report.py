"""An experiment's result as a report: a Markdown page (settings, the arms table, the verdicts in
words, the caveats) and a CSV with one row per arm, from experiment.json and summary.json."""

from __future__ import annotations

import csv
import io
import math

COLUMNS = ("arm", "spec", "records", "n_items", "acc", "acc_lo", "acc_hi", "acc_norm", "gold_prob", "delta",
           "delta_lo", "delta_hi", "mcnemar_p", "p_holm", "disagreement", "mde_80", "verdict")  # fmt: skip


def arm_rows(described: dict, summary: dict) -> list[dict]:
    """One flat row per arm of the summary, in the experiment's order (COLUMNS)."""
    specs = {a["name"]: a for a in described.get("arms", [])}
    rows = []
    for name in [a["name"] for a in described.get("arms", []) if a["name"] in summary["arms"]]:
        arm = summary["arms"][name]
        sizes = [n for n in (specs[name].get("records") or {}).values() if n is not None]
        acc_ci, delta_ci = arm.get("acc_ci") or [None, None], arm.get("delta_ci") or [None, None]
        rows.append({
            "arm": name, "spec": specs[name]["spec"], "records": sizes[0] if len(set(sizes)) == 1 else (sizes or None),
            "n_items": arm.get("n_items"), "acc": arm.get("acc"), "acc_lo": acc_ci[0], "acc_hi": acc_ci[1],
            "acc_norm": arm.get("acc_norm"), "gold_prob": arm.get("gold_prob"), "delta": arm.get("delta"),
            "delta_lo": delta_ci[0], "delta_hi": delta_ci[1], "mcnemar_p": arm.get("mcnemar_p"),
            "p_holm": arm.get("p_holm"), "disagreement": arm.get("disagreement"), "mde_80": arm.get("mde_80"),
            "verdict": arm.get("verdict", ""),
        })  # fmt: skip
    return rows


def csv_text(summary: dict, described: dict | None = None) -> str:
    described = described or {"arms": [{"name": n, "spec": ""} for n in summary["arms"]]}
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in arm_rows(described, summary):
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return out.getvalue()


def pct(value: float | None, signed: bool = False) -> str:
    """0.4123 -> '41.2' (points); '—' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def p_text(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def markdown(described: dict, summary: dict) -> str:
    """The report page: what was compared, the table, the verdicts, what the numbers cannot say."""
    rows = arm_rows(described, summary)
    train = described.get("train") or {}
    lines = [
        f"# Experiment {described.get('name', '')}", "",
        f"Run `{described.get('run', '')}`, model `{(described.get('model') or {}).get('model') or 'embedded SmolLM2-135M-Instruct'}`, "
        f"evaluated on {described.get('bench', '')} ({summary.get('n_items', '?')} items"
        + (f", the first {described['limit']} spread over the set" if described.get("limit") else "") + f"), "
        f"{described.get('seeds', 1)} seed(s) per arm. LoRA r {train.get('lora_r')}, learning rate {train.get('lr')}, "
        f"{train.get('epochs')} epoch(s), batch {train.get('batch_size')} x {train.get('grad_accum')}.", "",
        f"Baseline: **{summary.get('baseline')}**. Always answering the most common gold letter scores "
        f"{pct(summary.get('majority_acc'))}%.", "",
        "| arm | SPEC | records | accuracy % (95% CI) | vs baseline, points (95% CI) | McNemar p (Holm) | disagree % | gold prob | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['arm']} | `{r['spec']}` | {r['records'] if r['records'] is not None else '—'} | "
            f"{pct(r['acc'])} ({pct(r['acc_lo'])}–{pct(r['acc_hi'])}) | "
            + ("baseline" if r["arm"] == summary.get("baseline") else f"{pct(r['delta'], True)} ({pct(r['delta_lo'], True)} to {pct(r['delta_hi'], True)})")
            + f" | {p_text(r['mcnemar_p'])} ({p_text(r['p_holm'])}) | {pct(r['disagreement'])} | "
            f"{'—' if r['gold_prob'] is None else format(r['gold_prob'], '.3f')} | {r['verdict']} |"
        )  # fmt: skip
    lines += ["", "## What this can and cannot say", "",
              "- Confidence intervals are 95% bootstrap intervals over the items (seeds averaged per item first); the "
              "difference is paired item by item; p is the exact McNemar test, Holm-corrected across arms.",
              "- `mde_80` is the smallest difference this many items would detect 80% of the time: a smaller true "
              "difference can hide behind 'no detectable difference'.",
              "- One evaluation set and one model: a result here is evidence for this model on this set, not in general."]  # fmt: skip
    return "\n".join(lines) + "\n"
