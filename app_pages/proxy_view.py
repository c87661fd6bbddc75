"""The proxy checks that concern a run, shown on Compare (issue 33): which model scored the run, the
check that justified a proxy, and each check's verdict, gates, agreement table, scatter of target vs
proxy per metric with both sides' bands drawn, composition by source and timings. The numbers are
those of proxy_check.json (`threeds proxy-check`); the tables come from `threeds.views.proxy_report`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages import common
from threeds.errors import ThreedsError
from threeds.names import METRIC_NAMES, METRICS, metric_column
from threeds.rundir.proxy_link import checks_of, read_check
from threeds.rundir.read import Run, load_run
from threeds.selection.kcenter import band_thresholds
from threeds.views.proxy_report import agreement_rows, composition_rows, gate_rows, timing_rows

VERDICT_BOX = {"passes": st.success, "inconclusive": st.warning, "fails": st.error}
ROLES = {"own": "this run is the proxy's scoring in the check", "justifies": "the check that justified this run's model"}


def scored_by(run: Run) -> str:
    """Which model scored the run, in words, with the proxy check its manifest links."""
    model = (run.manifest.get("model") or {}).get("spec") or (run.manifest.get("score_config") or {}).get("model")
    text = f"Run {common.code(run.name)} was scored by {common.code(model or 'an unrecorded model')}"
    link = run.manifest.get("proxy_check")
    if isinstance(link, dict):
        text += (f", a proxy for {common.code(link.get('target_model'))}: proxy check {common.code(link.get('path'))} "
                 f"said **{common.md(link.get('verdict'))}**")  # fmt: skip
    return text + "."


def scatter(check: dict, target: Run, proxy: Run, metric: str) -> go.Figure:
    """Target vs proxy values of one metric over the shared records, each side's band as lines."""
    found = check["agreement"]
    column = metric_column(metric, found["atten_method"])
    shared = [i for i in target.metrics["id"] if i in proxy.row_of]
    x = target.metrics[column].to_numpy(dtype=float)[[target.row_of[i] for i in shared]]
    y = proxy.metrics[column].to_numpy(dtype=float)[[proxy.row_of[i] for i in shared]]
    picked = set(found["picks"]["target_ids"]) | set(found["picks"]["proxy_ids"])
    colour = np.where([i in picked for i in shared], "#2e7d32", "#90a4ae")
    figure = go.Figure(go.Scattergl(x=x, y=y, mode="markers", marker=dict(size=5, color=colour), customdata=shared,
                                    hovertemplate="%{customdata}<br>target %{x:.3g}<br>proxy %{y:.3g}<extra></extra>"))  # fmt: skip
    low, up = found["bands"][metric]
    for values, line in ((x, "x"), (y, "y")):
        for edge in band_thresholds(values, low, up):
            if np.isfinite(edge):
                figure.add_shape(type="line", xref="x" if line == "x" else "paper", yref="paper" if line == "x" else "y",
                                 x0=edge if line == "x" else 0, x1=edge if line == "x" else 1, y0=0 if line == "x" else edge,
                                 y1=1 if line == "x" else edge, line=dict(color="#e65100", dash="dash", width=1))  # fmt: skip
    rho = found["metrics"][metric]["spearman"]["rho"]
    title = f"{METRIC_NAMES[metric]} (rho {rho:.2f})" if rho is not None else METRIC_NAMES[metric]
    figure.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=10), title=title, xaxis_title="target", yaxis_title="proxy")
    return figure


def show_check(folder: Path, role: str) -> None:
    """One check: verdict, gates, agreement table, scatters, composition, time."""
    try:
        check = read_check(folder)
        target, proxy = load_run(check["target"]["run"]), load_run(check["proxy"]["run"])
    except (ThreedsError, OSError, ValueError) as exc:
        st.error(f"Cannot open the proxy check in {common.code(folder)}: {common.md(common.one_line_error(exc))}")
        return
    decided = check["verdict"]
    st.markdown(f"**{common.md(check['proxy']['model'])}** as a proxy for **{common.md(check['target']['model'])}** "
                f"({ROLES.get(role, 'its target is this run')}; {common.code(folder)})")  # fmt: skip
    VERDICT_BOX.get(decided["verdict"], st.info)(f"Verdict: {decided['verdict']}. {common.md(decided['words'])}")
    key = f"proxy_{folder.name}_{role}"
    st.dataframe(pd.DataFrame(gate_rows(check)), hide_index=True, key=f"{key}_gates")
    st.dataframe(pd.DataFrame(agreement_rows(check)), hide_index=True, width="stretch", key=f"{key}_agreement")
    if target.metrics is not None and proxy.metrics is not None:
        cols = st.columns(3)
        for col, metric in zip(cols, METRICS):
            col.plotly_chart(scatter(check, target, proxy, metric), width="stretch", key=f"{key}_scatter_{metric}")
        st.caption("Each dot a record, green where either side picks it; dashed: each side's band at its own percentiles.")
    st.dataframe(pd.DataFrame(composition_rows(check)), hide_index=True, key=f"{key}_composition")
    st.dataframe(pd.DataFrame(timing_rows(check)), hide_index=True, key=f"{key}_timing")


def section(runs: list[Run]) -> None:
    """Which model scored each run, and every proxy check that concerns one of them."""
    st.subheader("Scoring model and proxy checks")
    shown: set[Path] = set()
    for run in runs:
        if run.path in {r.path for r in runs[: runs.index(run)]}:
            continue
        st.markdown(scored_by(run))
        for role, folder in checks_of(run.path, run.manifest, common.cache_dir()).items():
            if folder.resolve() not in shown:
                shown.add(folder.resolve())
                show_check(folder, role)
    if not shown:
        st.caption("No proxy check concerns these runs. `threeds proxy-check --run RUN --proxy MODEL --out DIR` makes one "
                   "(README, proxy check).")  # fmt: skip
