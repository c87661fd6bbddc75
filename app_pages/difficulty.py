"""Difficulty: the three Stage-2 metrics, their percentile bands, and what the intersection keeps."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app_pages import common, raster, state
from threeds.names import ANSWER_FLAG_NAMES, ANSWER_FLAGS, METRICS, metric_column
from threeds.rundir import layout
from threeds.selection.answer_flags import (
    HIT_MAX_SLACK,
    REPEAT_MIN_COUNT,
    REPEAT_N,
    REPEAT_SHARE,
)

SPLOM_POINTS = 3000
SPLOM_AUTO_MAX = 5_000  # scored samples up to which the scatter matrix is drawn by default
IN_COLOUR, OUT_COLOUR = "#1565c0", "#bdbdbd"


def histogram_figure(values: np.ndarray, key: tuple, lo: float | None, hi: float | None, log: bool) -> go.Figure:
    """Pre-binned histogram (bins cached per column) with the band [lo, hi] shaded.

    Built in one constructor call (Plotly's add_*/update_* chain costs several times more on
    every re-render); the band is a filled trace, in data coordinates on a log axis too."""
    counts, edges = common.histogram(values, key, log=log)
    centres = np.sqrt(edges[:-1] * edges[1:]) if log else (edges[:-1] + edges[1:]) / 2
    traces = []
    if lo is not None and hi is not None and counts.size:
        top = float(counts.max()) * 1.05
        traces.append(
            go.Scatter(
                x=[lo, lo, hi, hi, lo], y=[0, top, top, 0, 0], fill="toself", mode="lines", line_width=0,
                fillcolor="rgba(21,101,192,0.15)", name="band", hoverinfo="skip",
            )
        )  # fmt: skip
    inside = np.zeros(len(centres), bool) if lo is None else (centres >= lo) & (centres <= hi)
    traces.append(
        go.Bar(
            x=centres, y=counts, width=np.diff(edges), name="samples",
            marker=dict(color=np.where(inside, IN_COLOUR, OUT_COLOUR).tolist()),  # a few dozen bars: names are cheap
        )
    )  # fmt: skip
    layout = dict(
        height=260, margin=dict(l=10, r=10, t=10, b=10), bargap=0, showlegend=False,
        xaxis=dict(type="log" if log else "linear"), dragmode="select", selectdirection="h",
    )  # fmt: skip
    return go.Figure(data=traces, layout=layout)


def brush_histogram(metric: str, column: str, values: np.ndarray) -> None:
    """A box dragged on a histogram brushes the samples whose value lies in its x range."""
    boxes = st.session_state[f"hist_{metric}"]["selection"].get("box") or []
    if not boxes:
        return
    lo, hi = sorted(float(x) for x in boxes[0]["x"][:2])
    with np.errstate(invalid="ignore"):
        rows = np.flatnonzero((values >= lo) & (values <= hi))
    state.set_brush(rows, f"{len(rows):,} samples with {column} in {lo:.4g} – {hi:.4g} (Difficulty)")


def band_panel(col, run, metric: str, info: dict, log: bool) -> None:
    column = metric_column(metric, state.selection().atten_method)
    with col:
        st.markdown(f"**{common.metric_label(metric)}**")
        st.slider("percentile band", 0.0, 100.0, step=1.0, format="%.0f", **state.bind(f"band_{metric}"))
        values = run.metrics[column].to_numpy(dtype=float)
        st.plotly_chart(
            histogram_figure(values, (common.key_of(run), column, log), info["lo"], info["hi"], log),
            width="stretch", key=f"hist_{metric}", on_select=lambda: brush_histogram(metric, column, values),
            selection_mode="box",
        )  # fmt: skip
        if info["lo"] is not None:
            st.caption(f"band {info['lo']:.4g} – {info['hi']:.4g}")
        st.metric("removed by this band", f"{info['n_removed']:,}")
        if info["n_nan"]:
            st.caption(f"{info['n_nan']:,} NaN: {info['nan_reason']}")


FLAG_HELP = {
    "hit_max": f"A' reached the run's max-new-tokens (within {HIT_MAX_SLACK:.0%}, counted as re-encoded by scoring): cut off, not finished",
    "repeats": f"at least {REPEAT_SHARE:.0%} of A''s words lie in a {REPEAT_N}-word sequence it says {REPEAT_MIN_COUNT}+ times",
    "empty": "A' blank once whitespace and invisible characters are set aside (scoring sets such records aside, so this is rare here)",
}


def flag_panel(run) -> None:
    """How many answers carry each flag on A', and the rule that drops them before the bands."""
    flags = common.answer_flags(run, wait=False)
    if flags is None:
        if run.metrics is not None and run.records is not None:
            common.flags_coming(run)
        return
    counts = flags.counts()
    cols = st.columns(4)
    for col, name in zip(cols, ANSWER_FLAGS):
        col.metric(f"A' {ANSWER_FLAG_NAMES[name]}", f"{counts[name]:,}", help=FLAG_HELP[name])
    cols[3].multiselect(
        "Drop flagged A' before the bands", ANSWER_FLAGS, **state.bind("exclude_flags"), format_func=ANSWER_FLAG_NAMES.get,
        help="part of the selection: the bands' percentiles are then taken over the other samples (threeds select --exclude-flagged)",
    )  # fmt: skip
    if flags.cap is None:
        st.caption("hit max-new-tokens: unknown, the run did not generate A' itself (its manifest records no max_new_tokens)")
    else:
        st.caption(f"A' generated with max-new-tokens {flags.cap:,}; counts are over all {len(flags.repeat_share):,} scored samples")


def scatter_matrix(run, mask: np.ndarray) -> go.Figure:
    rows = common.display_rows(len(mask), SPLOM_POINTS)
    atten = state.selection().atten_method
    dims = [dict(label=m, values=run.metrics[metric_column(m, atten)].to_numpy()[rows]) for m in METRICS]
    splom = go.Splom(
        dimensions=dims, showupperhalf=False, diagonal_visible=False,
        # numbers, not colour names: Plotly validates a list of strings one by one (slow)
        marker=dict(size=3, color=mask[rows].astype(np.int8), colorscale=[[0, OUT_COLOUR], [1, IN_COLOUR]], cmin=0, cmax=1),
        hovertemplate="%{x:.4g}, %{y:.4g}<extra></extra>",
    )  # fmt: skip
    return go.Figure(data=[splom], layout=dict(height=520, margin=dict(l=10, r=10, t=10, b=10), dragmode="select"))


def main() -> None:
    st.title("Difficulty (Stage 2)")
    run = common.require_run()
    common.require(run, layout.METRICS)
    c1, c2 = st.columns([2, 1])
    with c1:
        common.atten_toggle()
    log = c2.toggle("log x for Instruction Understanding", key="ins_ppl_log")
    done = common.filtered(run)
    mask, report = done.in_bands, done.report
    k1, k2, k3 = st.columns(3)
    k1.metric("in all three bands", f"{report['n_kept']:,}")
    pool = "scored samples kept by quality" + (", A' not flagged" if state.selection().exclude_flags else "")
    k2.metric(pool, f"{report['n_total']:,}", help="the bands' percentiles are taken over these")
    k3.metric("excluded (NaN metric)", f"{report['n_excluded_nan']:,}")
    flag_panel(run)
    for col, metric in zip(st.columns(3), METRICS):
        band_panel(col, run, metric, report["metrics"][metric], log and metric == "ins_ppl")
    scatter_section(run, mask)


def scatter_section(run, mask: np.ndarray) -> None:
    """The scatter matrix, on by default up to SPLOM_AUTO_MAX samples: its WebGL plot is rebuilt on
    every band move, which on 100k samples was most of a move's time in the browser (BENCHMARKS (c2))."""
    st.subheader("Scatter matrix")
    if not st.toggle("show the scatter matrix", value=len(mask) <= SPLOM_AUTO_MAX, key="show_splom",
                     help=f"off by default above {SPLOM_AUTO_MAX:,} samples: redrawing it slows every band move"):  # fmt: skip
        st.caption("hidden: switch it on to see the three metrics against each other")
        return
    shown = min(len(mask), SPLOM_POINTS)
    st.caption(f"blue: inside all three bands; {shown:,} of {len(mask):,} samples drawn" + (" (fixed random subset)" if shown < len(mask) else "")
               + " · a box or lasso on a panel brushes every sample inside it (see **Samples**)")  # fmt: skip
    if state.brushed_rows() is not None:
        st.caption(f"Brushed: {st.session_state.get('brush_label', '')}")
    st.plotly_chart(
        scatter_matrix(run, mask), width="stretch", key="splom", on_select=lambda: brush_splom(run),
        selection_mode=("box", "lasso"),
    )  # fmt: skip


def brush_splom(run) -> None:
    """A box or lasso on a panel of the scatter matrix brushes every sample inside it, drawn or not."""
    chosen = st.session_state["splom"]["selection"]
    boxes, lassos = chosen.get("box") or [], chosen.get("lasso") or []
    if not boxes and not lassos:
        return
    atten = state.selection().atten_method
    columns = [run.metrics[metric_column(m, atten)].to_numpy(dtype=float) for m in METRICS]
    rows = raster.panel_rows(columns, boxes, lassos)
    if rows is not None:  # Plotly names the panel (axes) of every box and lasso
        state.set_brush(rows, f"{len(rows):,} samples from a box/lasso on the scatter matrix (Difficulty)")


main()
