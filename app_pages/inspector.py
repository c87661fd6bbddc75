"""Sample inspector: one sample's texts, per-token heatmaps (attention weight share, loss, and their
product: each token's contribution to the weighted loss, `threeds.views.heatmap`) and where it ranks."""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from app_pages import common, state
from threeds.io.data import full_instruction
from threeds.names import (
    ANSWER_FLAG_NAMES,
    ANSWER_FLAGS,
    METRIC_NAMES,
    METRICS,
    metric_column,
)
from threeds.rundir import layout
from threeds.rundir.read import RunFileError
from threeds.selection.answer_flags import REPEAT_SHARE
from threeds.selection.apply import percentile_ranks
from threeds.selection.verdicts import explained
from threeds.views import heatmap

MATCHES = 50
RESPONSES = {"gt": ("A (ground truth)", "output"), "gen": ("A' (model's own answer)", "generated_output")}


@st.cache_data(max_entries=16, show_spinner="Searching the instructions…")
def find(_run, key: tuple, query: str) -> list[str]:
    """Ids matching `query`: the id itself, else the first MATCHES instructions containing it
    (case-insensitive; data.jsonl read a chunk at a time until they are found)."""
    query = query.strip()
    if not query:
        return []
    if query in _run.row_of:
        return [query]
    rows = _run.records.matching(query, full_instruction, limit=MATCHES)
    return [str(i) for i in _run.metrics["id"].to_numpy()[rows]]


COLOURS = {"attention weight": (21, 101, 192), "loss": (230, 81, 0), "contribution": (106, 27, 154)}  # blue, orange, purple
BOX = "white-space:pre-wrap;font-family:monospace;font-size:0.85rem;line-height:1.6;border:1px solid #e0e0e0;border-radius:4px;padding:6px"
CLIPPED = "outline:2px dashed #212121;outline-offset:0;"


def cell_style(view_name: str, fill: float, clipped: bool) -> str:
    r, g, b = COLOURS[view_name]
    text = "color:#fff;" if fill > 0.6 else ""
    return f"background:rgba({r},{g},{b},{fill:.3f});{text}{CLIPPED if clipped else ''}"


def tooltip(row, weight: str, total: float) -> str:
    part = f" ({100 * row.contribution / total:.1f}% of the weighted loss)" if total > 0 and not row.function_word else ""
    return "\n".join([
        repr(row.token) + ("  (end-of-turn marker)" if row.marker else ""),
        f"loss {row.loss:.3f}",
        f"weight share {100 * row.share:.2f}%  ({weight} {getattr(row, weight):.4g})",
        f"contribution {row.contribution:.4g}{part}",
        "function word: yes (dropped from the weighted loss)" if row.function_word else "function word: no",
    ])  # fmt: skip


def heatmap_html(view: pd.DataFrame, view_name: str, weight: str, text: str) -> str:
    """Tokens laid out as the response text in a fixed-height scrolling box, background by the
    view's column on a robust scale (`threeds.views.heatmap.view_scale`; clipped cells outlined);
    function words greyed. Pieces come from the offsets, so tokens sharing a character do not
    repeat it."""
    column = heatmap.VIEWS[view_name][0]
    scale = heatmap.view_scale(view, column)
    total = float(view["contribution"].sum())
    spans, cursor = [], 0
    for i, row in enumerate(view.itertuples(index=False)):
        piece = row.token if row.start >= len(text) else text[max(cursor, row.start) : row.end]
        cursor = max(cursor, row.end)
        if not piece:
            continue
        style = "color:#9e9e9e;" if row.function_word else cell_style(view_name, scale.fill[i], scale.clipped[i])
        spans.append(f'<span title="{html.escape(tooltip(row, weight, total))}" style="{style}">{html.escape(piece)}</span>')
    return legend_html(view_name, scale) + f'<div style="{BOX};max-height:22rem;overflow-y:auto">{"".join(spans)}</div>'


def legend_html(view_name: str, scale: heatmap.Scale) -> str:
    """Gradient from 0 to the scale's top with values, the clipped and function-word swatches."""
    r, g, b = COLOURS[view_name]
    n_clipped = int(scale.clipped.sum())
    bar = f"display:inline-block;width:9rem;height:0.8rem;vertical-align:middle;background:linear-gradient(to right,rgba({r},{g},{b},0),rgb({r},{g},{b}));border:1px solid #ccc"
    return (
        f'<div style="font-size:0.8rem;margin-bottom:4px">0 <span style="{bar}"></span> {scale.top:.3g}'
        f' &nbsp;<span style="{CLIPPED}padding:0 3px;background:rgb({r},{g},{b});color:#fff">&gt; {scale.top:.3g}</span>'
        f" clipped ({n_clipped}) &nbsp;<span style=\"color:#9e9e9e\">grey: function word</span></div>"
    )


def response_panel(col, tokens: pd.DataFrame, response: str, record: dict, view_name: str) -> None:
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
        view = heatmap.token_view(part, weight, len(text))
        marker_share, marker_loss = heatmap.marker_part(view)
        st.markdown(f"**{response}_wloss_{weight[2:]}** = {heatmap.weighted_loss(view):.4f} (sum of the contributions)")
        st.html(heatmap_html(view, view_name, weight, text))
        st.caption(
            f"{len(view)} tokens, {int(view['function_word'].sum())} function words (grey); the end-of-turn "
            f"marker holds {100 * marker_share:.1f}% of the weight and {100 * marker_loss:.1f}% of the weighted loss"
        )


def metric_table(run, row: int) -> pd.DataFrame:
    """Every metric column's value for the sample and its percentile rank among all samples."""
    atten = state.selection().atten_method  # the selection's, not this page's view
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
                    "percentile rank": percentile_ranks(values[row : row + 1], values)[0],
                    "used by the selection": method == atten or metric == "ins_ppl",
                }
            )
    return pd.DataFrame(rows)


def chosen_id(run) -> str | None:
    """From a link (?id=, read into the session by app_pages.state), another page or the search box."""
    query = st.text_input("Find a sample by id or text", key="inspect_query")
    if query:
        matches = find(run, common.key_of(run), query)
        if not matches:
            st.warning(f"No sample id or instruction matches {common.md(repr(query))}.")
        else:
            labels = {m: f"{m} — {common.short(full_instruction(run.records[run.row_of[m]]), 90)}" for m in matches}
            label = f"{len(matches)} match(es)" + (" (first 50)" if len(matches) == MATCHES else "")
            pick = st.selectbox(label, matches, format_func=labels.get, key="inspect_match")
            st.session_state["inspect_id"] = pick
    return st.session_state.get("inspect_id")


def attention_view() -> None:
    """This page's own attention view: it colours the tokens and never changes the selection."""
    st.session_state.setdefault("inspect_atten", state.selection().atten_method)
    st.radio(
        "Attention view (this page only)", ("mean", "max"), key="inspect_atten", horizontal=True,
        help="which per-token weights to draw; the selection's method is set on Difficulty",
    )  # fmt: skip


def flag_badges(run, row: int) -> None:
    """The flags on this sample's A' as badges, with the numbers behind them."""
    flags = common.answer_flags(run, wait=False)
    if flags is None:
        return
    names = [name for name in ANSWER_FLAGS if flags.masks[name][row]]
    tokens = "" if flags.tokens is None else f"{flags.tokens[row]:.0f} tokens of max-new-tokens {flags.cap:,}; "
    numbers = f"{tokens}repeat share {flags.repeat_share[row]:.2f} (flagged from {REPEAT_SHARE:g})"
    if names:
        badges = " ".join(f":orange-badge[:material/flag: A' {ANSWER_FLAG_NAMES[name]}]" for name in names)
        st.markdown(badges)
        st.caption(numbers)
    else:
        st.caption(f"A' not flagged: {numbers}")


@st.fragment
def responses(tokens: pd.DataFrame | None, record: dict) -> None:
    """A and A' side by side with this page's view options: a fragment, since the views change
    only these heatmaps, never the selection."""
    attention_view()
    view_name = st.radio(
        "Heatmap", list(heatmap.VIEWS), horizontal=True, key="inspect_view",
        help="; ".join(f"{name}: {what}" for name, (_, what) in heatmap.VIEWS.items())
        + f". Colour scale: 0 to the {heatmap.SCALE_PERCENTILE:g}th percentile of the kept tokens other than the end-of-turn marker; cells above it are outlined.",
    )  # fmt: skip
    for col, response in zip(st.columns(2), RESPONSES):
        if tokens is None:
            col.subheader(RESPONSES[response][0])
            col.text(str(record.get(RESPONSES[response][1], "")))
        else:
            response_panel(col, tokens, response, record, view_name)


def main() -> None:
    st.title("Sample inspector")
    run = common.require_run()
    common.require(run, layout.METRICS, layout.DATA)
    sample_id = chosen_id(run)
    if sample_id not in run.row_of:
        st.info("Type an id or some words of an instruction, or click a point on **Embedding map**.")
        return
    row = run.row_of[sample_id]
    record = run.records[row]
    chosen = common.selection(run)
    rank = f" (pick #{chosen.rank[row]:,})" if chosen.rank[row] else ""
    st.markdown(f"### {common.code(sample_id)}  ·  selection: **{chosen.verdict[row]}**{rank}")
    st.markdown("\n".join(f"- {common.md(rule)}" + (f" — *{common.md(meaning)}*" if meaning else "") for rule, meaning in explained(chosen.reason[row])))
    flag_badges(run, row)
    st.markdown("**Instruction**")
    st.text(full_instruction(record))
    try:
        tokens = run.tokens(sample_id)
    except RunFileError as exc:
        st.error(common.md(common.one_line_error(exc)))
        tokens = None
    responses(tokens, record)
    st.markdown("**Metrics and percentile ranks** (rank = % of scored samples at or below this value)")
    st.dataframe(
        metric_table(run, row), hide_index=True, width="stretch",
        column_config={"value": st.column_config.NumberColumn(format="%.4f"), "percentile rank": st.column_config.NumberColumn(format="%.1f")},
    )  # fmt: skip

main()
