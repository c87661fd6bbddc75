"""Compare: two selections side by side, as two presets of one run or two runs over the same records.

Each side is a run and a selection on it (the current one, or a saved preset of that run); the
library applies both (`threeds.selection.apply`) and says which ids both, only A and only B pick.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages import common, proxy_view
from threeds.names import METRIC_NAMES, METRICS, metric_column
from threeds.rundir import layout
from threeds.selection.apply import (
    SelectionError,
    difference_table,
    list_presets,
    load_preset,
    overlap,
)

CURRENT = "(current selection)"
COLOURS = {"A": "#1565c0", "B": "#e65100", "both": "#2e7d32", "neither": "#c8c8c8"}


def side(label: str, default_preset: int):
    """Pick a run and one of its selections; returns (run, Selection)."""
    names = common.run_names()
    run_name = st.selectbox(f"{label}: run", names, index=names.index(st.session_state["run_name"]), key=f"compare_run_{label}")
    run = common.current_run(run_name)
    common.require(run, layout.METRICS, layout.EMBEDDINGS, layout.DATA)
    options = [CURRENT, *list_presets(run.path)]
    choice = st.selectbox(f"{label}: selection", options, index=min(default_preset, len(options) - 1), key=f"compare_sel_{label}")
    try:
        config = common.selection_config(run) if choice == CURRENT else load_preset(run.path, choice)
        return run, common.selection(run, config)
    except SelectionError as exc:
        st.error(str(exc))
        st.stop()


def counts_table(a, b) -> pd.DataFrame:
    """Counts per stage of the funnel, the stages neither side can say (None) left out."""
    stages = [s for s in a.funnel if a.funnel[s] is not None or b.funnel[s] is not None]
    return pd.DataFrame({"stage": stages, "A": [a.funnel[s] for s in stages], "B": [b.funnel[s] for s in stages]})


def histograms(run_a, a, run_b, b) -> None:
    cols = st.columns(3)
    for col, metric in zip(cols, METRICS):
        traces = []
        for name, run, chosen in (("A", run_a, a), ("B", run_b, b)):
            column = metric_column(metric, chosen.config.atten_method)
            values = run.metrics[column].to_numpy(dtype=float)[chosen.picked]
            traces.append(go.Histogram(x=values, name=f"{name} ({column})", opacity=0.55, marker_color=COLOURS[name], nbinsx=40))
        figure = go.Figure(traces, layout=dict(barmode="overlay", height=260, margin=dict(l=10, r=10, t=30, b=10), title=METRIC_NAMES[metric], legend=dict(orientation="h")))
        col.plotly_chart(figure, width="stretch", key=f"compare_hist_{metric}")


def overlap_map(run_a, parts: dict) -> None:
    """A's map coloured by who picks each sample (ids of B that A's run lacks are not drawn)."""
    if len(run_a.metrics) < 4:
        return
    coords = common.umap_coords(run_a, common.key_of(run_a))
    group = np.full(len(run_a.metrics), "neither", dtype=object)
    for name, key in (("A", "only A"), ("B", "only B"), ("both", "both")):
        rows = [run_a.row_of[i] for i in parts[key] if i in run_a.row_of]
        group[rows] = name
    shown = np.union1d(common.display_rows(len(coords), 8000), np.flatnonzero(group != "neither"))
    traces = [
        go.Scattergl(x=coords[rows, 0], y=coords[rows, 1], mode="markers", name=name, marker=dict(size=4 if name == "neither" else 7, color=COLOURS[name]),
                     customdata=run_a.metrics["id"].to_numpy()[rows], hovertemplate="%{customdata}<extra>" + name + "</extra>")
        for name in ("neither", "A", "B", "both") if len(rows := shown[group[shown] == name])
    ]  # fmt: skip
    axis = dict(showticklabels=False)
    st.plotly_chart(go.Figure(traces, layout=dict(height=520, margin=dict(l=10, r=10, t=10, b=10), xaxis=axis, yaxis=axis, legend=dict(orientation="h"))), width="stretch", key="compare_map")


def main() -> None:
    st.title("Compare two selections")
    common.require_run()
    c1, c2 = st.columns(2)
    with c1:
        run_a, a = side("A", 0)
    with c2:
        run_b, b = side("B", 1)
    parts = overlap(a.picked_ids, b.picked_ids)
    k1, k2, k3 = st.columns(3)
    k1.metric("picked by both", f"{len(parts['both']):,}")
    k2.metric("only A", f"{len(parts['only A']):,}")
    k3.metric("only B", f"{len(parts['only B']):,}")
    st.dataframe(counts_table(a, b), hide_index=True, key="compare_counts")
    diff = difference_table(a, b)
    st.download_button(
        f"Download the difference ({len(diff):,} ids, CSV)", diff.to_csv(index=False).encode("utf-8"),
        file_name=f"compare_{run_a.name}_{run_b.name}.csv", mime="text/csv", key="compare_download", on_click="ignore",
    )  # fmt: skip
    st.subheader("Picked samples' metrics")
    histograms(run_a, a, run_b, b)
    st.subheader(f"Map of run {run_a.name}: who picks what")
    overlap_map(run_a, parts)
    st.subheader("Difference")
    st.dataframe(diff.head(2000), hide_index=True, width="stretch", key="compare_diff")
    proxy_view.section([run_a, run_b])


main()
