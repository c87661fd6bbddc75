"""An experiment's result as a report: a Markdown page (settings, the arms table, the verdicts in
words, the caveats) and a CSV with one row per arm, from experiment.json and summary.json."""

from __future__ import annotations

import csv
import io
import math

from threeds.outcomes.stats import callable_text

COLUMNS = ("arm", "spec", "records", "n_items", "acc", "acc_lo", "acc_hi", "acc_norm", "gold_prob", "delta",
           "delta_lo", "delta_hi", "mcnemar_p", "p_holm", "differ", "disagreement", "min_callable", "verdict")  # fmt: skip


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
            "p_holm": arm.get("p_holm"), "differ": arm.get("differ"), "disagreement": arm.get("disagreement"),
            "min_callable": arm.get("min_callable"), "verdict": arm.get("verdict", ""),
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
    lines = [
        f"# Experiment {described.get('name', '')}", "", _settings_text(described, summary), "",
        f"Baseline: **{summary.get('baseline')}**. Always answering the most common gold letter scores "
        f"{pct(summary.get('majority_acc'))}%.", "",
        "| arm | SPEC | records | accuracy % (95% CI) | vs baseline, points (95% CI) | items that differ "
        "| McNemar p (Holm) | gold prob | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_table_row(r, summary.get("baseline")) for r in arm_rows(described, summary)),
        "", "## What this can and cannot say", "", *(f"- {c}" for c in caveats(described, summary)),
        "- An arm's accuracy interval is a 95% bootstrap interval over the items (seeds averaged per item first). "
        "The difference from the baseline is paired item by item: its interval is Newcombe's for paired "
        "proportions (Wilson score, method 10), and p is the exact McNemar test on the items where the two "
        "differ, Holm-corrected across arms.",
        *([f"- {planning_text(summary)}"] if summary.get("plan") else []),
        "- One evaluation set and one model: a result here is evidence for this model on this set, not in general.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _settings_text(described: dict, summary: dict) -> str:
    train = described.get("train") or {}
    model = (described.get("model") or {}).get("model") or "embedded SmolLM2-135M-Instruct"
    spread = f", {described['limit']} spread over the set" if described.get("limit") else ""
    return (f"Run `{described.get('run', '')}`, model `{model}`, evaluated on {described.get('bench', '')} "
            f"({summary.get('n_items', '?')} items{spread}, {described.get('prompt_format', 'chat')} prompts, "
            f"{described.get('shots', 0)}-shot), {described.get('seeds', 1)} seed(s) per arm. LoRA r "
            f"{train.get('lora_r')}, learning rate {train.get('lr')}, {train.get('epochs')} epoch(s), batch "
            f"{train.get('batch_size')} x {train.get('grad_accum')}.")  # fmt: skip


def versus_text(r: dict, baseline: str | None) -> str:
    """'+1.0 (-1.8 to +3.8)', or 'baseline'."""
    if r["arm"] == baseline:
        return "baseline"
    return f"{pct(r['delta'], True)} ({pct(r['delta_lo'], True)} to {pct(r['delta_hi'], True)})"


def _table_row(r: dict, baseline: str | None) -> str:
    records = "—" if r["records"] is None else r["records"]
    gold = "—" if r["gold_prob"] is None else format(r["gold_prob"], ".3f")
    return (f"| {r['arm']} | `{r['spec']}` | {records} | {pct(r['acc'])} ({pct(r['acc_lo'])}–{pct(r['acc_hi'])}) "
            f"| {versus_text(r, baseline)} | {r['differ'] or '—'} | {p_text(r['mcnemar_p'])} ({p_text(r['p_holm'])}) "
            f"| {gold} | {r['verdict']} |")


def planning_text(summary: dict) -> str:
    """What a next experiment would need, at stated assumptions (stats.plan)."""
    plan, family = summary["plan"], summary.get("comparisons", 1)
    holm = f", Holm over {family} comparisons" if family > 1 else ""
    return (f"Planning: to detect a true {100 * plan['delta']:.0f}-point difference 80% of the time (5% level{holm}) takes "
            f"about {plan['n_items']:,} items if {100 * plan['discordant_share']:.0f}% of the items are answered right by "
            "only one of the two arms (an assumption, not measured here; more discordance needs more items).")


# ------------------------------------------------------------------------------ what the page shows


def caveats(described: dict, summary: dict | None, units: dict | None = None) -> list[str]:
    """What this experiment cannot say, in words, from its own settings (the page and the report show them)."""
    found = []
    if not (described.get("model") or {}).get("model"):
        found.append("The model is the embedded SmolLM2-135M-Instruct, a stand-in small enough for a CPU that answers "
                     "these exams near chance: the result says nothing about what the selection does for a real target model.")  # fmt: skip
    sizes = [n for arm in described.get("arms", []) for n in (arm.get("records") or {}).values() if n is not None]
    if sizes and min(sizes) < 200:
        steps = [u.get("steps") for u in (units or {}).values() if u.get("steps")]
        found.append(f"Tiny training sets ({min(sizes)} records at the least" + (f", {min(steps)} optimizer step(s)" if steps else "")
                     + "): LoRA barely moves the model, so the arms are expected to look alike.")  # fmt: skip
    if summary and summary.get("n_items", 10**9) < 500:
        widths = [(a["acc_ci"][1] - a["acc_ci"][0]) / 2 for a in summary.get("arms", {}).values() if a.get("acc_ci")]
        found.append(f"Only {summary['n_items']} evaluation items" + (f": one arm's accuracy is known to about "
                     f"±{100 * max(widths):.0f} points (95% CI)" if widths else "") + ".")  # fmt: skip
    if summary and "min_callable" in summary:
        family = summary.get("comparisons", 1)
        holm = f" (exact McNemar test, Holm over {family} comparisons)" if family > 1 else " (exact McNemar test)"
        found.append(callable_text(summary["min_callable"], summary["n_items"]).capitalize() + holm + ".")
    if described.get("seeds", 1) == 1 and any(a["spec"] != "base" for a in described.get("arms", [])):
        found.append("One seed per arm: how much a training varies with its seed (and a random subset with its draw) is not measured.")
    return found


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def subject_table(summary: dict) -> list[dict]:
    """Per subject: the number of items and each arm's accuracy (from the summary's per-subject stats)."""
    arms = summary.get("arms", {})
    subjects = next(iter(arms.values()), {}).get("subjects", {})
    return [{"subject": name, "n": part["n_items"], **{arm: stats["subjects"][name]["acc"] for arm, stats in arms.items()}}
            for name, part in subjects.items()]  # fmt: skip


def _seeds_right(runs: list[list[dict]]) -> dict[str, tuple[int, int]]:
    """Per item id: (seeds that got it right, seeds that evaluated it)."""
    found: dict[str, list[bool]] = {}
    for run in runs:
        for row in run:
            found.setdefault(row["id"], []).append(bool(row["correct"]))
    return {item: (sum(v), len(v)) for item, v in found.items()}


def answer_text(row: dict, right: tuple[int, int]) -> str:
    """'A: 50.2% vs 49.8% for B (1 of 1 seeds right)': the answer, its probability among the choices
    (softmax of the summed log-probabilities, first seed) against the runner-up's, and the seeds right."""
    probs = softmax(row["logprobs"])
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    top, second = order[0], order[1]
    return (f"{_letter(row['pred'])}: {100 * probs[top]:.1f}% vs {100 * probs[second]:.1f}% for {_letter(second)} "
            f"({right[0]} of {right[1]} seeds right)")


def disagreements(evals: dict[str, list[list[dict]]]) -> list[dict]:
    """Items where the arms' answers (first seed) differ: id, subject, gold and each arm's answer
    with its probability margin and how many seeds got the item right (`answer_text`)."""
    first = {arm: {row["id"]: row for row in runs[0]} for arm, runs in evals.items()}
    right = {arm: _seeds_right(runs) for arm, runs in evals.items()}
    rows = []
    for row in next(iter(evals.values()))[0]:
        found = {arm: rows_[row["id"]] for arm, rows_ in first.items() if row["id"] in rows_}
        if len({r["pred"] for r in found.values()}) > 1:
            rows.append({"id": row["id"], "subject": row.get("subject", ""), "gold": _letter(row["gold"]),
                         **{arm: answer_text(r, right[arm][row["id"]]) for arm, r in found.items()}})  # fmt: skip
    return rows


def item_detail(evals: dict[str, list[list[dict]]], item_id: str) -> dict:
    """One item for the page: its prompt, its choices and, per arm (first seed), the probability of
    each choice among the choices (softmax of their summed log-probabilities)."""
    rows = {arm: next(r for r in runs[0] if r["id"] == item_id) for arm, runs in evals.items()}
    any_row = next(iter(rows.values()))
    return {"prompt": any_row["prompt"], "choices": any_row["choices"], "gold": any_row["gold"],
            "probs": {arm: softmax(row["logprobs"]) for arm, row in rows.items()}}  # fmt: skip


def _letter(index: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[index] if 0 <= index < 26 else str(index)
