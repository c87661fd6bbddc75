"""Embedding map: UMAP of the instruction embeddings, coloured by metric, quality, band or pick."""

from __future__ import annotations

import functools
import html

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app_pages import common
from threeds.data import full_instruction
from threeds.embed_map import MIN_POINTS
from threeds.names import METRICS, metric_column

MAP_POINTS = 8_000  # drawn besides the picks: each drawn point costs every re-render (hover text)
SVG_POINTS = 1_500  # up to this many drawn points, SVG: a WebGL plot is rebuilt on every re-render, which
# took twice as long in the browser on the demo run (BENCHMARKS (c2)); above it, SVG itself gets slow
GREY = "#c8c8c8"


@st.cache_resource(max_entries=4, show_spinner=False)
def hover_texts(_run, key: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(ids, escaped instruction starts) per row, made once per run: the map re-sends them on
    every re-render, so short strings keep re-renders fast."""
    ids = _run.metrics["id"].to_numpy(dtype=str)
    return ids, np.array([html.escape(common.short(full_instruction(r), 80)) for r in _run.records], dtype=str)


def colour_options(run) -> list[str]:
    atten = st.session_state["atten_method"]
    options = ["k-center pick", "in band", *(metric_column(m, atten) for m in METRICS)]
    return options + (["quality"] if run.ratings is not None else [])


def quality_scores(run) -> np.ndarray:
    scores = dict(zip(run.ratings["id"], run.ratings["score"]))
    return np.array([scores.get(i, np.nan) for i in run.metrics["id"]], dtype=float)


def scatter(x, y, rows, ids, texts, name: str, marker: dict, extra: str = "", gl: bool = True) -> go.Scatter:
    kind = go.Scattergl if gl else go.Scatter
    return kind(
        x=x[rows], y=y[rows], mode="markers", name=name, marker=marker, customdata=ids[rows], text=texts[rows],
        hovertemplate="<b>%{customdata}</b>" + extra + "<br>%{text}<extra></extra>",
    )  # fmt: skip


def map_figure(run, coords: np.ndarray, colour: str, picked: np.ndarray, shown: np.ndarray) -> go.Figure:
    """The map in one constructor call (Plotly's add_*/update_* chain is slow on every re-render)."""
    x, y = coords[:, 0], coords[:, 1]
    ids, texts = hover_texts(run, common.key_of(run))
    draw = functools.partial(scatter, gl=len(shown) > SVG_POINTS)
    if colour == "k-center pick":
        order = np.empty(len(ids), dtype=float)
        order[picked] = np.arange(1, len(picked) + 1)
        traces = [
            draw(x, y, np.setdiff1d(shown, picked), ids, texts, "not picked", dict(size=4, color=GREY)),
            draw(
                x, y, picked, ids, texts, "picked",
                dict(size=7, color=order[picked], colorscale="Viridis", colorbar=dict(title="pick #", **({"dtick": 1} if len(picked) <= 10 else {}))),  # whole pick numbers
                extra=" · pick #%{marker.color}",
            ),
        ]  # fmt: skip
    elif colour == "in band":
        mask = common.filtered(run).in_bands
        traces = [
            draw(x, y, shown[mask[shown] == inside], ids, texts, name, dict(size=5, color=c))
            for inside, name, c in ((False, "outside a band", GREY), (True, "in all bands", "#1565c0"))
        ]
    else:
        values = quality_scores(run) if colour == "quality" else run.metrics[colour].to_numpy(dtype=float)
        traces = [
            draw(
                x, y, shown, ids, texts, colour,
                dict(size=5, color=values[shown], colorscale="Viridis", colorbar=dict(title=colour)),
                extra=f" · {colour} %{{marker.color:.4g}}",
            )
        ]  # fmt: skip
    axis = dict(showticklabels=False)
    layout = dict(
        height=620, margin=dict(l=10, r=10, t=10, b=10), legend=dict(orientation="h"), dragmode="pan",
        xaxis=dict(axis, title="UMAP 1"), yaxis=dict(axis, title="UMAP 2"),
    )  # fmt: skip
    return go.Figure(data=traces, layout=layout)


def on_select(run) -> None:
    """A box or lasso brushes its points (the Samples table shows them); a click opens the inspector."""
    chosen = st.session_state["map"]["selection"]
    points = chosen["points"]
    if chosen.get("box") or chosen.get("lasso"):
        rows = [run.row_of[str(p["customdata"])] for p in points if str(p.get("customdata")) in run.row_of]
        common.set_brush(np.asarray(rows, dtype=np.int64), f"{len(rows):,} points from a box/lasso on the map")
    elif points:
        st.session_state["inspect_id"] = str(points[0]["customdata"])
        st.session_state["goto_inspector"] = True


def grey_unbrushed(figure: go.Figure, run, brushed: np.ndarray) -> None:
    """Mark brushed points selected in every trace: Plotly greys the others (they stay drawn)."""
    wanted = set(run.metrics["id"].to_numpy(dtype=str)[brushed])
    for trace in figure.data:
        trace.selectedpoints = [i for i, sample_id in enumerate(trace.customdata) if sample_id in wanted]
        trace.unselected = dict(marker=dict(opacity=0.25))


def main() -> None:
    st.title("Embedding map")
    run = common.require_run()
    common.require(run, "metrics.parquet", "embeddings.npy", "data.jsonl")
    if len(run.metrics) < MIN_POINTS:
        st.info(f"A map needs at least {MIN_POINTS} scored samples; this run has {len(run.metrics)}.")
        return
    coords = common.umap_coords(run, common.key_of(run))
    c1, c2 = st.columns([1, 2])
    with c1:
        common.atten_toggle()
    with c2:
        common.sample_num_slider(run)
    picked = common.picks(run)
    shown = np.union1d(common.display_rows(len(coords), MAP_POINTS), picked)
    st.caption(
        f"{len(picked):,} k-center picks among {len(common.filtered(run).candidates):,} candidates · "
        f"{len(shown):,} of {len(coords):,} points drawn · click a point to open it in the inspector"
    )
    map_view(run, coords, picked, shown)


@st.fragment
def map_view(run, coords: np.ndarray, picked: np.ndarray, shown: np.ndarray) -> None:
    """Colour, map and brush: a fragment, since they change no selection setting, so choosing a
    colour or drawing a box reruns only this part (a click opens the inspector from here)."""
    if st.session_state.pop("goto_inspector", False):
        common.open_inspector(st.session_state["inspect_id"])
    colour = st.selectbox("Colour by", colour_options(run), key="map_colour")
    figure = map_figure(run, coords, colour, picked, shown)
    brushed = common.brushed_rows()
    if brushed is not None:
        grey_unbrushed(figure, run, brushed)
        st.caption(f"Brushed: {st.session_state.get('brush_label', '')} · unbrushed points greyed · see **Samples**")
    st.plotly_chart(
        figure, key="map", on_select=lambda: on_select(run), selection_mode=("points", "box", "lasso"), width="stretch",
    )  # fmt: skip


main()
