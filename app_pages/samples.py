"""Samples: every scored sample with its metrics, percentiles, verdict, why and pick rank.

The table is computed by the library (`threeds.selection.apply.sample_table`) for the current
selection, as columns (no Python object per row but the ids and whys the selection holds); this
page filters, searches and sorts it on the server and sends one page of SHOWN rows, reading the
texts of that page's rows only (data.jsonl by row, `threeds.rundir.record_index`): it pages
through the 1.9M rows of the paper's pool. Selecting a row opens it in the inspector.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd
import streamlit as st

from app_pages import common, state
from threeds.io.data import full_instruction
from threeds.names import ANSWER_FLAG_NAMES, METRIC_NAMES, METRICS
from threeds.rundir import layout
from threeds.rundir.read import Run
from threeds.selection.apply import VERDICTS, sample_table

SHOWN = 2_000
SORTS = {"pick rank": ("pick", True), "quality": ("quality", False), **{f"{METRIC_NAMES[m]}": (METRIC_NAMES[m], False) for m in METRICS}}


def searched_text(record: dict) -> str:
    """What the search looks in: the instruction (with its input), A and A'."""
    return f"{full_instruction(record)}\n{record.get('output', '')}\n{record.get('generated_output', '')}"


@st.cache_data(max_entries=16, show_spinner="Searching the texts…")
def search_rows(_run: Run, key: tuple, query: str) -> np.ndarray:
    """Rows whose instruction, A or A' contains `query` (case-insensitive): data.jsonl read a chunk
    at a time (`RecordFile.matching`), never all texts in memory; once per query."""
    return _run.records.matching(query, searched_text)


def contains_any(column: pd.Series, wanted: list[str]) -> np.ndarray:
    """Per row, whether the text contains any of `wanted`: tested once per distinct text (a why or
    a flag label repeats across the rows), not once per row."""
    codes, distinct = pd.factorize(column)
    hit = pd.Series(distinct).str.contains("|".join(map(re.escape, wanted)), regex=True).to_numpy(dtype=bool)
    return np.append(hit, False)[codes]  # code -1 (missing): no match


@st.cache_resource(max_entries=8, show_spinner=False)
def table_of(_run: Run, key: tuple, config: tuple, _chosen, _flags, flagged: bool) -> pd.DataFrame:
    done = common.filtered(_run, _chosen.config)
    return sample_table(_chosen, _run.metrics, done.quality, done.pool, _flags)


def reason_kinds() -> list[str]:
    kinds = ["quality", "not rated", *(f"A' {name}" for name in ANSWER_FLAG_NAMES.values()), "excluded by rule", "always include", "not among"]
    for metric in METRICS:
        kinds += [f"{METRIC_NAMES[metric]} below", f"{METRIC_NAMES[metric]} above", f"{METRIC_NAMES[metric]}: no value"]
    return kinds


def filtered_rows(run: Run, table: pd.DataFrame, verdicts: list[str], reasons: list[str], flags: list[str], query: str) -> np.ndarray:
    """Rows matching every filter: verdict, any of the reason kinds, any of the flags on A', the search text."""
    keep = table["verdict"].isin(verdicts).to_numpy().copy()
    for column, wanted in (("why", reasons), ("A' flags", flags)):
        if wanted:
            keep &= contains_any(table[column], wanted)
    if query.strip():
        found = np.zeros(len(table), dtype=bool)
        found[search_rows(run, common.key_of(run), query.strip())] = True
        keep &= found
    keep &= state.brushed_mask(len(table))
    return np.flatnonzero(keep)


def brush_and_rules(run: Run) -> None:
    """The brush from the map or a histogram, and turning it into an include/exclude rule."""
    brushed = state.brushed_rows()
    if brushed is not None:
        ids = [str(i) for i in run.metrics["id"].to_numpy()[brushed]]
        c1, c2, c3, c4 = st.columns([4, 2, 2, 2])
        c1.info(f"Brushed: {st.session_state.get('brush_label', '')}")
        c2.button("Always include these", key="rule_add_include", on_click=state.add_rule, args=("include", ids))
        c3.button("Exclude these", key="rule_add_exclude", on_click=state.add_rule, args=("exclude", ids))
        c4.button("Clear brush", key="brush_clear", on_click=state.clear_brush)
    include, exclude = state.selection().include, state.selection().exclude
    if include or exclude:
        c1, c2 = st.columns([8, 2])
        c1.caption(f"Rules: always include {len(include):,} (k-center starts from them) · exclude {len(exclude):,}")
        c2.button("Clear rules", key="rules_clear", on_click=state.clear_rules)


def main() -> None:
    st.title("Samples")
    run = common.require_run()
    common.require(run, layout.METRICS, layout.EMBEDDINGS, layout.DATA)
    brush_and_rules(run)
    chosen = common.selection(run)
    flags = common.answer_flags(run, wait=False)  # a large run's come later: the A' flags column fills in then
    if flags is None and run.records is not None:
        common.flags_coming(run)  # the page reruns once they are in
    made = None if chosen.funnel["picked"] and not len(chosen.picked) else len(chosen.picked)  # picks pending or made
    table_view(run, table_of(run, common.key_of(run), (dataclasses.astuple(chosen.config), made), chosen, flags, flags is not None))


def valid_state(options: dict[str, list[str]]) -> None:
    """The filters and sort as a link or the session left them, kept to the options the page offers
    (a hand-edited link's unknown value is dropped; an absent one takes the default: every verdict,
    no reason or flag, pick rank)."""
    defaults = {"samples_verdict": list(VERDICTS), "samples_reason": [], "samples_flags": [], "samples_sort": next(iter(SORTS))}
    for key, allowed in options.items():
        value = st.session_state.get(key, defaults[key])
        if isinstance(defaults[key], list):
            st.session_state[key] = [v for v in value if v in allowed] if isinstance(value, list) else defaults[key]
        else:
            st.session_state[key] = value if value in allowed else defaults[key]


@st.fragment
def table_view(run: Run, table: pd.DataFrame) -> None:
    """Filters, search, sort and the table: a fragment, since none of them changes the selection, so
    a keystroke in the search reruns only this part of the page."""
    c1, c2, c3 = st.columns([4, 5, 3])  # wide enough that a verdict chip reads whole ("not picked", not "pic...")
    c4, c5 = st.columns([4, 2])
    options = {"samples_verdict": list(VERDICTS), "samples_reason": reason_kinds(), "samples_flags": list(ANSWER_FLAG_NAMES.values()),
               "samples_sort": list(SORTS)}  # fmt: skip
    valid_state(options)
    verdicts = c1.multiselect("Verdict", VERDICTS, key="samples_verdict")
    reasons = c2.multiselect("Why contains any of", options["samples_reason"], key="samples_reason")
    flags = c3.multiselect("A' flagged", options["samples_flags"], key="samples_flags", help="the model's own answer hit max-new-tokens, repeats itself or is empty (Difficulty page: counts and the rule that drops them)")
    query = c4.text_input("Search instruction, A and A'", key="samples_query", placeholder="words…")
    sort = c5.selectbox("Sort by", options["samples_sort"], key="samples_sort")
    rows = filtered_rows(run, table, verdicts, reasons, flags, query)
    pages = max(1, -(-len(rows) // SHOWN))
    if st.session_state.get("samples_page", 1) > pages:  # fewer rows match now: the last page
        st.session_state["samples_page"] = pages
    page = st.number_input(f"Page (of {pages:,}, {SHOWN:,} rows each)", 1, pages, key="samples_page") if pages > 1 else 1
    column, ascending = SORTS[sort]
    values = table[column].to_numpy()[rows]
    if column == "pick":  # picks first, in pick order
        values = np.where(values > 0, values, np.iinfo(np.int64).max)
    order = np.argsort(values if ascending else -np.nan_to_num(values, nan=-np.inf), kind="stable")
    rows = rows[order][(page - 1) * SHOWN : page * SHOWN]
    shown = table.iloc[rows].assign(instruction=[common.short(full_instruction(r), 100) for r in run.records.take(rows)])  # this page's texts only
    shown["pick"] = [f"{r:,}" if r else "" for r in shown["pick"]]  # blank, not "None", when not picked
    where = f"; rows {(page - 1) * SHOWN + 1:,}-{(page - 1) * SHOWN + len(rows):,} are shown" if len(order) > SHOWN else ""
    st.caption(f"{len(order):,} of {len(table):,} samples match{where} · select a row to open it in the inspector")
    columns = ["pick", "id", "verdict", "why", "in plain words", "A' flags", "instruction", "quality", *(c for m in METRICS for c in (METRIC_NAMES[m], f"{METRIC_NAMES[m]} %"))]
    number = st.column_config.NumberColumn
    event = st.dataframe(
        shown[columns], hide_index=True, width="stretch", height=560, key="samples_table",
        on_select="rerun", selection_mode="single-row",
        column_config={
            "pick": st.column_config.TextColumn("pick #"), "quality": number(format="%g"),
            "why": st.column_config.TextColumn(width="large"),  # the meaning: read whole, not cut at ~25 characters
            "in plain words": st.column_config.TextColumn(width="large", help="what the why means for the sample as training data"),
            **{METRIC_NAMES[m]: number(format="%.4g") for m in METRICS},
            **{f"{METRIC_NAMES[m]} %": number(format="%.1f", help="percentile rank among the samples kept by quality") for m in METRICS},
        },
    )  # fmt: skip
    common.fragment_wrote_url("samples")  # a fragment's rerun: the search goes in the URL now, not at the next full run
    picked = event.selection.rows if event is not None else []
    if picked:
        common.open_inspector(str(shown["id"].iloc[picked[0]]))


main()
