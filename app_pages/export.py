"""Export: the selection made with the current bands and sample_num, ready for LlamaFactory."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from app_pages import common
from threeds.io.data import full_instruction
from threeds.rundir import layout
from threeds.rundir.read import selected_ids
from threeds.views.export import (
    FORMATS,
    MIME,
    compare_selections,
    dataset_info_entry,
    export_text,
    file_name,
    select_command,
    selection_file_name,
)

LABELS = {"alpaca": "JSON (Alpaca)", "jsonl": "JSONL (Alpaca rows)", "sharegpt": "ShareGPT JSON"}


def main() -> None:
    st.title("Export")
    run = common.require_run()
    common.require(run, layout.METRICS, layout.EMBEDDINGS, layout.DATA)
    common.selection_controls(run)
    config = common.selection_config(run)
    rows = common.picks(run, config)
    if rows is None:  # made in the background: the panel above says so; the rest needs them
        st.metric("selected samples", "coming")
        return
    ids = tuple(str(i) for i in run.metrics["id"].to_numpy()[rows])
    records = run.records.take(rows)  # only the picks are read (threeds.rundir.record_index)
    st.metric("selected samples", f"{len(ids):,}")
    quality = "none" if config.quality_threshold is None else f"≥ {config.quality_threshold:g}"
    rules = f" · always include {len(config.include):,} · exclude {len(config.exclude):,}" if config.include or config.exclude else ""
    st.caption(
        f"quality {quality} (set on Quality) · bands " + ", ".join(f"{m} {lo:g}–{hi:g}" for m, (lo, hi) in config.bands().items())
        + f" · attention {config.atten_method} · seed {config.seed} (Difficulty / Embedding map){rules}"
    )  # fmt: skip
    if run.selection is not None:
        st.caption(compare_selections(selected_ids(run.selection), list(ids)))
    dataset = st.text_input("Dataset name (LlamaFactory)", value=f"threeds_{run.name}".replace("-", "_"), key="export_name")
    fmt = st.radio("Format", FORMATS, format_func=LABELS.get, horizontal=True, key="export_format")
    # The file is made when the button is clicked, not on every slider move.
    data = lambda: export_text(records, fmt).encode("utf-8")  # noqa: E731
    st.download_button(f"Download {file_name(dataset, fmt)}", data, file_name=file_name(dataset, fmt), mime=MIME[fmt], type="primary", on_click="ignore")
    has_system = any(r.get("system") for r in records)
    st.markdown("**`dataset_info.json` entry** (merge into LlamaFactory's `data/dataset_info.json`, put the file next to it)")
    st.code(json.dumps(dataset_info_entry(dataset, fmt, has_system), indent=2), language="json")
    st.markdown("**Reproduce this selection from the command line**")
    st.code(select_command(str(run.path.resolve()), selection_file_name(dataset), config), language="bash", wrap_lines=True)  # from any directory
    st.markdown("**First rows**")
    preview = pd.DataFrame({"pick": range(1, min(len(ids), 20) + 1), "id": ids[:20], "instruction": [common.short(full_instruction(r), 120) for r in records[:20]]})
    st.table(preview.set_index("pick"))  # static: 20 rows, no data-grid redraw after each sample_num move


main()
