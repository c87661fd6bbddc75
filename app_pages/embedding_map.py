"""Embedding map: UMAP of the instruction embeddings, coloured by metric, quality, band or pick."""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app_pages import common, raster, state
from threeds.io.data import full_instruction
from threeds.names import METRICS, metric_column
from threeds.rundir import layout
from threeds.views.embed_map import MIN_POINTS, fit_rows, map_fit

SVG_POINTS = 1_500  # up to this many points, each is an SVG marker; above, the map is an image (`raster`)
HOVER_POINTS = 120  # points an image map can hover and click (most of them the first picks): each SVG
# marker adds about 0.25 ms to every re-render in the browser
DENSITY_POINTS = 200_000  # above, the image is a density (`raster.Canvas.shade`) and
LARGE_HOVER_POINTS = 2_000  # this many points hover and click, one WebGL trace (a fixed cost, not per point)
GREY, BLUE = "#c8c8c8", "#1565c0"


@dataclass(frozen=True)
class Layer:
    """Points drawn alike: a name, their rows, one colour or values on the Viridis scale, a size."""

    name: str
    rows: np.ndarray
    colour: str | None = None
    values: np.ndarray | None = None  # per row of the run, when coloured by value
    size: int = 5
    title: str = ""  # the colour bar's
    hover: str = ""  # added to the hover text
    ordered: bool = False  # rows in a meaningful order (picks): an image map's hover reaches the first


def hover_texts(run, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, escaped instruction starts) of the drawn `rows`, read for those rows only (an image
    map of millions draws a few thousand markers): short strings keep re-renders fast."""
    ids = run.metrics["id"].to_numpy(dtype=str)[rows]
    return ids, np.array([html.escape(common.short(full_instruction(run.records[int(r)]), 80)) for r in rows], dtype=str)


def colour_options(run) -> list[str]:
    atten = state.selection().atten_method
    options = ["k-center pick", "in band", *(metric_column(m, atten) for m in METRICS)]
    return options + (["quality"] if run.ratings is not None else []) + (["fitted on"] if map_fit(run.path) is not None else [])


def quality_scores(run) -> np.ndarray:
    scores = dict(zip(run.ratings["id"], run.ratings["score"]))
    return np.array([scores.get(i, np.nan) for i in run.metrics["id"]], dtype=float)


def layers(run, colour: str, picked: np.ndarray | None) -> list[Layer]:
    """What the map draws for a colour choice, bottom layer first (picks still being made: the
    candidates they will come from)."""
    every = np.arange(len(run.metrics))
    if colour == "k-center pick" and picked is None:
        candidates = common.filtered(run).candidates
        return [Layer("not a candidate", np.setdiff1d(every, candidates), GREY, size=4), Layer("candidate (picks coming)", candidates, BLUE)]
    if colour == "k-center pick":
        order = np.full(len(every), np.nan)
        order[picked] = np.arange(1, len(picked) + 1)
        return [
            Layer("not picked", np.setdiff1d(every, picked), GREY, size=4),
            Layer("picked", picked, values=order, size=7, title="pick #", hover=" · pick #%{marker.color}", ordered=True),
        ]
    if colour == "fitted on":  # a sampled map (`threeds.views.embed_map`): the rows UMAP was fitted on
        fitted = fit_rows(run.metrics)
        return [Layer("placed by transform", np.setdiff1d(every, fitted), GREY), Layer("fitted on", fitted, BLUE)]
    if colour == "in band":
        mask = common.filtered(run).in_bands
        return [Layer("outside a band", every[~mask], GREY), Layer("in all bands", every[mask], BLUE)]
    values = quality_scores(run) if colour == "quality" else run.metrics[colour].to_numpy(dtype=float)
    finite = np.isfinite(values)
    return [Layer("no value", every[~finite], GREY), Layer(colour, every[finite], values=values, title=colour, hover=f" · {colour} %{{marker.color:.4g}}")]


def marker(layer: Layer, rows: np.ndarray, **extra) -> dict:
    if layer.values is None:
        return dict(size=layer.size, color=layer.colour, **extra)
    bar = dict(title=layer.title, **({"dtick": 1} if layer.ordered and len(layer.rows) <= 10 else {}))  # whole pick numbers
    low, high = value_range(layer)
    return dict(size=layer.size, color=layer.values[rows], colorscale="Viridis", cmin=low, cmax=high, colorbar=bar, **extra)


def scatter(coords, rows, run, name: str, marker: dict, hover: str = "", labels: np.ndarray | None = None) -> go.Scatter:
    """Markers with the sample id, `hover` (a Plotly template part) or per-point `labels`, and the
    instruction's start in the hover box."""
    ids, texts = hover_texts(run, rows)
    text = texts if labels is None else np.array([f"{label}<br>{t}" for label, t in zip(labels, texts)], dtype=object)
    kind = go.Scattergl if len(rows) > HOVER_POINTS else go.Scatter
    return kind(
        x=coords[rows, 0], y=coords[rows, 1], mode="markers", name=name, marker=marker, customdata=ids,
        text=text, hovertemplate="<b>%{customdata}</b>" + hover + "<br>%{text}<extra></extra>",
    )  # fmt: skip


def svg_figure(run, coords: np.ndarray, drawn: list[Layer]) -> go.Figure:
    """Every point an SVG marker (small maps): hover, click and brush reach them all."""
    traces = [scatter(coords, layer.rows, run, layer.name, marker(layer, layer.rows), layer.hover) for layer in drawn if len(layer.rows)]
    figure = go.Figure(data=traces, layout=map_layout())
    brushed = state.brushed_rows()
    if brushed is not None:
        grey_unbrushed(figure, run, brushed)
    return figure


def image_figure(run, coords: np.ndarray, drawn: list[Layer]) -> go.Figure:
    """Every point drawn into one image (large maps), under HOVER_POINTS near-transparent markers
    for hover and click: the earliest picks first, the rest at random."""
    box = raster.bounds(coords[:, 0], coords[:, 1])
    canvas = raster.Canvas(box)
    lit = state.brushed_mask(len(coords))
    dense = len(coords) > DENSITY_POINTS
    for alpha, part in ((60, ~lit), (255, lit)):  # unbrushed points faded, under the brushed ones
        for layer in drawn:
            rows = layer.rows[part[layer.rows]]
            if dense:
                values = None if layer.values is None else layer.values[rows]
                canvas.shade(coords[rows, 0], coords[rows, 1], raster.rgb(layer.colour) if layer.colour else None, values, value_range(layer), alpha)
                continue
            colours = raster.rgb(layer.colour) if layer.values is None else raster.viridis(layer.values[rows], *value_range(layer))
            canvas.draw(coords[rows, 0], coords[rows, 1], colours, size=3 if layer.size > 5 else 2, alpha=alpha)
    top, wanted = drawn[-1], hover_count(len(coords))
    first = top.rows[: wanted * 2 // 3] if top.ordered else top.rows[:0]
    hover = np.union1d(first, common.display_rows(len(coords), wanted - len(first)))
    points = scatter(coords, hover, run, "hover", dict(size=7, color=GREY, opacity=0.01), labels=hover_labels(drawn, hover))
    points.showlegend = False
    keys = [go.Scatter(x=[None], y=[None], mode="markers", name=layer.name, marker=dict(size=8, color=layer.colour))
            for layer in drawn if layer.values is None and len(layer.rows)]  # fmt: skip
    if top.values is not None and len(top.rows):  # the image's colour bar, from a trace with no point to draw
        low, high = value_range(top)
        keys.append(go.Scatter(x=[None, None], y=[None, None], mode="markers", showlegend=False, hoverinfo="skip",
                               marker=dict(marker(top, top.rows[:0]), color=[low, high])))  # fmt: skip
    figure = go.Figure(data=[points, *keys], layout=map_layout(box))
    figure.layout.images = [canvas.layout_image()]
    return figure


def hover_count(n: int) -> int:
    """Markers an image map of n points can hover and click."""
    return LARGE_HOVER_POINTS if n > DENSITY_POINTS else HOVER_POINTS


def hover_labels(drawn: list[Layer], rows: np.ndarray) -> np.ndarray:
    """Per row, its layer's name or its value (e.g. "pick # 12"): the hover text of an image map."""
    labels = np.empty(len(rows), dtype=object)
    for layer in drawn:
        hit = np.isin(rows, layer.rows)
        if layer.values is None:
            labels[hit] = layer.name
        else:
            fmt = ",.0f" if layer.ordered else ".4g"  # pick numbers whole, past 9,999 too
            labels[hit] = [f"{layer.title} {v:{fmt}}" for v in layer.values[rows[hit]]]
    return labels


def value_range(layer: Layer) -> tuple[float, float]:
    values = layer.values[layer.rows]
    return (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)


def map_layout(box: tuple[float, float, float, float] | None = None) -> dict:
    axis = dict(showticklabels=False)
    x, y = (dict(), dict()) if box is None else (dict(range=list(box[:2])), dict(range=list(box[2:])))
    return dict(
        height=620, margin=dict(l=10, r=10, t=10, b=10), legend=dict(orientation="h"), dragmode="pan",
        xaxis=dict(axis, title="UMAP 1", **x), yaxis=dict(axis, title="UMAP 2", **y),
    )  # fmt: skip


def on_select(run, coords: np.ndarray) -> None:
    """A box or lasso brushes every point inside it (the Samples table shows them), drawn or not;
    a click opens the inspector."""
    chosen = st.session_state["map"]["selection"]
    if chosen.get("box") or chosen.get("lasso"):
        rows = raster.selected_rows(coords[:, 0], coords[:, 1], chosen.get("box") or [], chosen.get("lasso") or [])
        state.set_brush(rows, f"{len(rows):,} points from a box/lasso on the map")
    elif chosen["points"]:
        st.session_state["inspect_id"] = str(chosen["points"][0]["customdata"])
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
    common.require(run, layout.METRICS, layout.EMBEDDINGS, layout.DATA)
    if len(run.metrics) < MIN_POINTS:
        st.info(f"A map needs at least {MIN_POINTS} scored samples; this run has {len(run.metrics)}.")
        return
    coords = common.umap_coords(run, common.key_of(run))
    common.selection_controls(run)
    picked = common.picks(run)
    drawn = "every point hoverable" if len(coords) <= SVG_POINTS else f"drawn as an image; hover and click reach {hover_count(len(coords)):,} of them, the first picks first"
    made = "k-center picks coming" if picked is None else f"{len(picked):,} k-center picks"
    st.caption(
        f"{made} among {len(common.filtered(run).candidates):,} candidates · {len(coords):,} points, "
        f"{drawn} · click a point to open it in the inspector · a box or lasso selects every point inside"
    )
    fit = map_fit(run.path)
    if fit is not None:
        st.caption(f"UMAP was fitted on {fit['rows']:,} of the {len(coords):,} rows, a sample stratified by the {fit['stratified_by']} "
                   f"(in their first {fit['pca_dims']} principal axes); every other row was placed on it with UMAP's transform. "
                   "Colour by \"fitted on\" shows which.")  # fmt: skip
    map_view(run, coords, picked)


@st.fragment
def map_view(run, coords: np.ndarray, picked: np.ndarray | None) -> None:
    """Colour, map and brush: a fragment, since they change no selection setting, so choosing a
    colour or drawing a box reruns only this part (a click opens the inspector from here)."""
    if st.session_state.pop("goto_inspector", False):
        common.open_inspector(st.session_state["inspect_id"])
    colour = st.selectbox("Colour by", colour_options(run), key="map_colour")
    draw = svg_figure if len(coords) <= SVG_POINTS else image_figure
    figure = draw(run, coords, layers(run, colour, picked))
    if state.brushed_rows() is not None:
        st.caption(f"Brushed: {st.session_state.get('brush_label', '')} · unbrushed points greyed · see **Samples**")
    st.plotly_chart(
        figure, key="map", on_select=lambda: on_select(run, coords), selection_mode=("points", "box", "lasso"), width="stretch",
    )  # fmt: skip
    common.fragment_wrote_url("embedding_map")  # a fragment's rerun: a new brush goes in the URL now


main()
