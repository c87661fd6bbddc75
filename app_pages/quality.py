"""Quality: Stage-1 self-ratings, the threshold that keeps a pair, and what sits at the border."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages import common, state
from threeds.rundir import layout
from threeds.rundir.read import Run, run_settings
from threeds.rundir.sources import scored_sources
from threeds.selection.quality import kept_per_bin, quality_mask
from threeds.views.sources import rating_sources

EXAMPLES = 3


@st.cache_resource(max_entries=8, show_spinner=False)  # a resource, not data: 1.9M scores are not copied on every rerun
def score_order(_run: Run, key: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row order by score) of the rated records; NaN (unrated) sorts last."""
    scores = _run.ratings["score"].to_numpy(dtype=float)
    return scores, np.argsort(scores, kind="stable")


@st.cache_resource(max_entries=4, show_spinner=False)
def _sources(_run: Run, key: tuple) -> Future:
    """Per rated row, an index into a list of `source` values, or None when no record names one:
    made in the background, since the first time a large run's data.jsonl is read whole."""

    def work() -> tuple[np.ndarray, list[str]] | None:
        ids = _run.ratings["id"].astype(str)
        if _run.records is None:  # no data.jsonl: every source from the input file
            rows, scored = np.full(len(ids), -1), (np.zeros(0, np.int32), [])
        else:
            rows, scored = _run.row_of.ids.get_indexer(ids), scored_sources(_run.path, _run.records)
        return rating_sources(ids, rows, scored, _run.unscored_records if (rows < 0).any() else {})

    return common.in_background(work, "threeds-sources")


def histogram_figure(scores: np.ndarray, threshold: float, key: tuple) -> go.Figure:
    """Pre-binned (cached) score histogram, each bar split by the scores in it: the kept ones green,
    the dropped ones grey (a bin's centre says nothing: at threshold 91 the bin 90-92 may hold only
    90s); built in one constructor call, several times faster than Plotly's add_*/update_* chain."""
    counts, edges = common.histogram(scores, (key, "score"), bins=50, span=(0.0, 100.0))
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    kept = kept_per_bin(scores, threshold, edges)
    bars = [
        go.Bar(x=centres, y=part, width=widths, name=name, marker_color=colour)
        for part, name, colour in ((kept, "kept", "#2e7d32"), (counts - kept, "dropped", "#bdbdbd"))
    ]
    layout = dict(
        height=320, margin=dict(l=10, r=10, t=30, b=10), bargap=0, barmode="stack",
        xaxis_title="Stage-1 score (0-100)", yaxis_title="records",
        shapes=[dict(type="line", x0=threshold, x1=threshold, y0=0, y1=1, yref="paper", line=dict(dash="dash"))],
    )  # fmt: skip
    return go.Figure(data=bars, layout=layout)


def border_examples(run: Run, scores: np.ndarray, order: np.ndarray, threshold: float) -> None:
    rated = order[~np.isnan(scores[order])]
    cut = int(np.searchsorted(scores[rated], threshold, side="left"))
    above, below = rated[cut : cut + EXAMPLES], rated[max(0, cut - EXAMPLES) : cut][::-1]
    c1, c2 = st.columns(2)
    for col, rows, title in ((c1, above, "Just above (kept)"), (c2, below, "Just below (dropped)")):
        col.subheader(title)
        if len(rows) == 0:
            col.caption("none")
        for row in rows:
            sample_id = str(run.ratings["id"].iloc[row])
            rec = run.record(sample_id) or {}
            with col.container(border=True):
                st.markdown(f"**{scores[row]:g}** · {common.code(sample_id)}")
                st.text("Q: " + common.short(rec.get("instruction", "(text not available)"), 200))  # text: no markdown in data
                st.text("A: " + common.short(rec.get("output", ""), 300))
                if sample_id in run.row_of and st.button("Inspect", key=f"inspect_{sample_id}"):
                    common.open_inspector(sample_id)


def source_breakdown(codes: np.ndarray, names: list[str], kept: np.ndarray) -> pd.DataFrame:
    total = np.bincount(codes, minlength=len(names))
    kept_n = np.bincount(codes, weights=kept, minlength=len(names)).astype(int)
    frame = pd.DataFrame({"source": names, "rated": total, "kept": kept_n, "dropped": total - kept_n})
    frame["kept %"] = (100 * frame["kept"] / frame["rated"].clip(lower=1)).round(1)
    return frame.sort_values("rated", ascending=False)


def main() -> None:
    st.title("Quality (Stage 1)")
    run = common.require_run()
    common.require(run, layout.RATINGS)
    key = common.key_of(run)
    scores, order = score_order(run, key)
    threshold = st.slider("Quality threshold (keep score ≥ threshold)", 0.0, 100.0, step=1.0, format="%.0f", **state.bind("quality_threshold"))
    kept = quality_mask(scores, threshold)
    unrated = int(np.isnan(scores).sum())
    c1, c2, c3 = st.columns(3)
    c1.metric("kept", f"{int(kept.sum()):,}")
    c2.metric("dropped", f"{int((~kept).sum()):,}")
    c3.metric("unrated (no score)", f"{unrated:,}")
    used = run_settings(run).get("quality_threshold")
    if used is not None:
        st.caption(f"This run scored the records rated ≥ {used:g}; the slider explores other thresholds without re-scoring.")
    st.plotly_chart(histogram_figure(scores, threshold, key), width="stretch")
    border_examples(run, scores, order, threshold)
    future = _sources(run, key)
    ready, sources = common.ready_result(future, len(scores), False, "Reading the records' sources…")
    if not ready:
        st.subheader("By source")
        common.coming(future, "sources_pending", f"Reading the sources of {len(scores):,} records in the background (once per run)…")
    elif sources is not None:
        st.subheader("By source")
        st.table(source_breakdown(*sources, kept).set_index("source"))  # static: a few rows, no data-grid redraw


main()
