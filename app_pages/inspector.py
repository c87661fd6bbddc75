"""Sample inspector: one sample's texts, per-token attention weight and loss, and where it ranks."""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from app_pages import common
from threeds.data import full_instruction
from threeds.runs import RunFileError, percentile_rank
from threeds.names import METRIC_NAMES, METRICS, metric_column

MATCHES = 50
RESPONSES = {"gt": ("A (ground truth)", "output"), "gen": ("A' (model's own answer)", "generated_output")}


@st.cache_data(max_entries=4, show_spinner=False)
def instruction_texts(_run, key: tuple) -> list[str]:
    return [full_instruction(r).lower() for r in _run.records]


def find(run, query: str) -> list[str]:
    """Ids matching `query`: the id itself, else instructions containing it (case-insensitive)."""
    query = query.strip()
    if not query:
        return []
    if query in run.row_of:
        return [query]
    needle = query.lower()
    texts = instruction_texts(run, common.key_of(run))
    ids = run.metrics["id"]
    return [str(ids.iloc[i]) for i, t in enumerate(texts) if needle in t][:MATCHES]


def heatmap_html(tokens: pd.DataFrame, value: str, text: str) -> str:
    """Tokens laid out as the response text, background by `value` (scaled to the response's kept
    maximum); function words (dropped from the weighted loss) greyed; hover shows token, loss and
    weights. Pieces come from the offsets, so tokens sharing a character do not repeat it."""
    kept = tokens.loc[~tokens["function_word"], value]
    top = float(kept.max()) if len(kept) and kept.max() > 0 else 1.0
    spans, cursor = [], 0
    for row in tokens.itertuples(index=False):
        piece = row.token if row.start >= len(text) else text[max(cursor, row.start) : row.end]
        cursor = max(cursor, row.end)
        if not piece:
            continue
        tip = f"{row.token!r}  loss {row.loss:.3f}  w_mean {row.w_mean:.4g}  w_max {row.w_max:.4g}"
        if row.function_word:
            style, tip = "color:#9e9e9e;", tip + "  (function word: dropped)"
        else:
            style = f"background:rgba(211,47,47,{min(1.0, max(0.0, float(getattr(row, value)) / top)):.3f});"
        spans.append(f'<span title="{html.escape(tip)}" style="{style}">{html.escape(piece)}</span>')
    return (
        '<div style="white-space:pre-wrap;font-family:monospace;font-size:0.85rem;line-height:1.6;'
        f'border:1px solid #e0e0e0;border-radius:4px;padding:6px">{"".join(spans)}</div>'
    )


def response_panel(col, run, tokens: pd.DataFrame, response: str, record: dict) -> None:
    title, field = RESPONSES[response]
    weight = f"w_{st.session_state['inspect_atten']}"
    part = tokens[tokens["response"] == response]
    text = str(record.get(field, ""))
    with col:
        st.subheader(title)
        if part.empty:
            st.info("No tokens for this response in tokens.parquet.")
            st.text(text)
            return
        st.markdown(f"**attention weight** (`{weight}`, darker = more weight)")
        st.html(heatmap_html(part, weight, text))
        st.markdown("**loss** (darker = higher)")
        st.html(heatmap_html(part, "loss", text))
        st.caption(f"{len(part)} tokens, {int(part['function_word'].sum())} function words (grey)")


def metric_table(run, row: int) -> pd.DataFrame:
    """Every metric column's value for the sample and its percentile rank among all samples."""
    atten = st.session_state["atten_method"]  # the selection's, not this page's view
    rows = []
    for metric in METRICS:
        for method in ("mean", "max") if metric != "ins_ppl" else ("mean",):
            column = metric_column(metric, method)
            values = run.metrics[column].to_numpy(dtype=float)
            rows.append(
                {
                    "metric": METRIC_NAMES[metric],
                    "column": column,
                    "value": values[row],
                    "percentile rank": percentile_rank(values, values[row]),
                    "used by the selection": method == atten or metric == "ins_ppl",
                }
            )
    return pd.DataFrame(rows)


def chosen_id(run) -> str | None:
    """From a link (?id=, read into the session by app_pages.url_state), another page or the search box."""
    query = st.text_input("Find a sample by id or text", key="inspect_query")
    if query:
        matches = find(run, query)
        if not matches:
            st.warning(f"No sample id or instruction matches {query!r}.")
        else:
            labels = {m: f"{m} — {common.short(full_instruction(run.records[run.row_of[m]]), 90)}" for m in matches}
            label = f"{len(matches)} match(es)" + (" (first 50)" if len(matches) == MATCHES else "")
            pick = st.selectbox(label, matches, format_func=labels.get, key="inspect_match")
            st.session_state["inspect_id"] = pick
    return st.session_state.get("inspect_id")


def attention_view() -> None:
    """This page's own attention view: it colours the tokens and never changes the selection."""
    st.session_state.setdefault("inspect_atten", st.session_state["atten_method"])
    st.radio(
        "Attention view (this page only)", ("mean", "max"), key="inspect_atten", horizontal=True,
        help="which per-token weights to draw; the selection's method is set on Difficulty",
    )  # fmt: skip


def main() -> None:
    st.title("Sample inspector")
    run = common.require_run()
    common.require(run, "metrics.parquet", "data.jsonl")
    attention_view()
    sample_id = chosen_id(run)
    if sample_id not in run.row_of:
        st.info("Type an id or some words of an instruction, or click a point on **Embedding map**.")
        return
    row = run.row_of[sample_id]
    record = run.records[row]
    chosen = common.selection(run)
    rank = f" (pick #{chosen.rank[row]:,})" if chosen.rank[row] else ""
    st.markdown(f"### `{sample_id}`  ·  selection: **{chosen.verdict[row]}**{rank}")
    st.caption(f"why: {chosen.reason[row]}")
    st.markdown("**Instruction**")
    st.text(full_instruction(record))
    try:
        tokens = run.tokens(sample_id)
    except RunFileError as exc:
        st.error(str(exc))
        tokens = None
    for col, response in zip(st.columns(2), RESPONSES):
        if tokens is None:
            col.subheader(RESPONSES[response][0])
            col.text(str(record.get(RESPONSES[response][1], "")))
        else:
            response_panel(col, run, tokens, response, record)
    st.markdown("**Metrics and percentile ranks** (rank = % of scored samples at or below this value)")
    st.dataframe(
        metric_table(run, row), hide_index=True, width="stretch",
        column_config={"value": st.column_config.NumberColumn(format="%.4f"), "percentile rank": st.column_config.NumberColumn(format="%.1f")},
    )  # fmt: skip

main()
