"""Names shared by every module: metrics, their paper names and short flag names, and the columns
of the run files (docs/DESIGN.md). One place, so a reader and a writer cannot drift apart."""

from __future__ import annotations

# The three difficulty metrics of Stage 2 (spec items 2-6), in the paper's order.
METRICS = ("ins_ppl", "gen_wloss", "gt_wloss")
METRIC_NAMES = {
    "ins_ppl": "Instruction Understanding",
    "gen_wloss": "Response Confidence",
    "gt_wloss": "Response Correctness",
}
PAPER_NAMES = {
    "ins_ppl": "Instruction Understanding (prompt perplexity)",
    "gen_wloss": "Response Confidence (weighted loss of the model's own answer A')",
    "gt_wloss": "Response Correctness (weighted loss of the ground truth A)",
}
SHORT_NAMES = {"ins_ppl": "ins", "gen_wloss": "conf", "gt_wloss": "corr"}  # in flags: --ins-low, --conf-up, ...
ATTEN_METHODS = ("mean", "max")

# metrics.parquet
METRIC_COLUMNS = ["id", "ins_ppl", "gt_wloss_mean", "gt_wloss_max", "gen_wloss_mean", "gen_wloss_max"]
SCORE_COLUMNS = [
    *METRIC_COLUMNS, "prompt_tokens", "gt_tokens", "gen_tokens", "gt_kept_tokens", "gen_kept_tokens",
    "gt_truncated", "gen_truncated", "truncated",
]  # fmt: skip
# tokens.parquet: one row per response token
TOKEN_COLUMNS = ["id", "response", "pos", "token", "start", "end", "loss", "w_mean", "w_max", "function_word"]


def metric_column(metric: str, atten_method: str = "mean") -> str:
    """Column of metrics.parquet holding `metric`; the weighted losses exist per attention method."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if atten_method not in ATTEN_METHODS:
        raise ValueError(f"unknown atten_method {atten_method!r}; expected one of {ATTEN_METHODS}")
    return metric if metric == "ins_ppl" else f"{metric}_{atten_method}"

# Flags on A', the model's own answer (threeds.selection.answer_flags); SelectConfig.exclude_flags names them.
ANSWER_FLAGS = ("hit_max", "repeats", "empty")
ANSWER_FLAG_NAMES = {"hit_max": "hit max-new-tokens", "repeats": "repeats itself", "empty": "empty"}
