"""threeds app: explore a 3DS run's difficulty, tune the bands, inspect attention, export.

`streamlit run app.py` (binds 127.0.0.1, see .streamlit/config.toml). This file runs first on
every page: page config, shared state, the run picker and the navigation; it also holds the Runs
page. The other pages are in app_pages/ (not `pages/`: Streamlit treats a `pages/` directory as
the older file-per-page navigation and, on a server's first request for a page URL, would run
that file without this one).
"""

from __future__ import annotations

import hashlib
import re
import shlex
import time
from pathlib import Path

import pandas as pd
import streamlit as st

import threeds
from app_pages import common
from threeds.config import BackendConfig, DataConfig, FilterConfig, ModelConfig, RunConfig, SelectConfig, run_command
from threeds.runs import NOT_RUNS, job_running, log_tail, read_job, read_progress, stage_counts, start_run, stop_run

SAMPLE_DATA = Path(threeds.__file__).parent / "sample_data"
DATA_TYPES = ["json", "jsonl", "parquet", "csv"]
STAGE_FILES = ["ratings.jsonl", "metrics.parquet", "embeddings.npy", "tokens.parquet", "selection.json"]


def runs_page() -> None:
    st.title("Runs")
    names = common.run_names()
    if not names:
        st.info(
            "No run yet in `cache/`. Start one below, or make the demo run with "
            "`python bench/make_demo.py` (see the README) and reload."
        )
    else:
        run_table(names)
    run = common.current_run()
    if run is not None:
        show_run(run)
    start_form()


def run_table(names: list[str]) -> None:
    rows = []
    for name in names:
        path = common.cache_dir() / name
        progress = read_progress(path) or {}
        rows.append(
            {
                "run": name,
                **{f: (path / f).exists() for f in STAGE_FILES},
                "running": job_running(path),
                "stage": progress.get("stage", ""),
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def show_run(run) -> None:
    st.header(f"Run `{run.name}`")
    for file, problem in run.errors.items():
        st.error(f"`{file}`: {problem}")
    # Re-drawn every 2 s while a background run works, without re-running the whole page.
    st.fragment(progress_panel, run_every=2 if job_running(run.path) else None)(str(run.path))
    counts = list(stage_counts(run).items())
    for row in (counts[:4], counts[4:]):
        for col, (label, value) in zip(st.columns(4), row):
            col.metric(label, "—" if value is None else f"{value:,}")
    with st.expander("Manifest", expanded=False):
        if run.manifest:
            st.json(run.manifest)
        else:
            st.caption("No manifest.json yet.")


def progress_panel(path: str) -> None:
    """Progress of the run's current stage, and Stop/Resume for a run started from this page."""
    run_dir = Path(path)
    running = job_running(run_dir)
    progress = read_progress(run_dir) or {}
    finished = progress.get("stage") == "done"
    if progress and not finished:
        done, total = int(progress.get("done", 0)), int(progress.get("total", 0)) or 1
        age = time.time() - float(progress.get("updated", time.time()))
        st.progress(min(done / total, 1.0), text=f"{progress.get('stage', '?')}: {done:,} / {total:,} (updated {age:.0f} s ago)")
    job = read_job(run_dir)
    if running:
        c1, c2 = st.columns([1, 5])
        c2.caption(f"Running in the background (pid {job['pid']}); you can leave this page and come back.")
        if c1.button("Stop", key="stop_run"):
            stop_run(run_dir)
            st.rerun(scope="app")
    elif job is not None and not finished:
        c1, c2 = st.columns([1, 5])
        c2.caption("Stopped before the end. Resume runs the same command again; finished work is kept.")
        if c1.button("Resume", key="resume_run"):
            start_run(job["argv"], run_dir)
            st.rerun(scope="app")
    if job is not None:
        with st.expander("Command and log", expanded=running or not finished):
            st.code(shlex.join(job["argv"]), language="bash")
            st.code(log_tail(run_dir) or "(no output yet)", language=None)
    was_running = st.session_state.setdefault("was_running", {})
    if was_running.get(path) and not running:
        was_running[path] = False
        st.rerun(scope="app")  # the run ended: reload its files on every element of the page
    was_running[path] = running


def start_form() -> None:
    st.header("Start a new run")
    # English first: the embedded model is English.
    samples = sorted((p.name for p in SAMPLE_DATA.glob("*") if p.suffix.lstrip(".") in DATA_TYPES), key=lambda n: ("_en" not in n, n))
    source = st.radio("Data", ["Sample data", "Upload", "Path on this machine"], horizontal=True, key="new_source")
    if source == "Sample data":
        if not samples:
            st.warning(f"No sample data found in {SAMPLE_DATA}.")
        choice = st.selectbox("Sample data set", samples, key="new_sample")
        data = str(SAMPLE_DATA / choice) if choice else ""
    elif source == "Upload":
        upload = st.file_uploader("Data set", type=DATA_TYPES, key="new_upload")
        data = save_upload(upload) if upload else ""
    else:
        data = st.text_input("Data file", key="new_path", placeholder="/path/to/data.jsonl")
    taken = set(common.run_names())
    st.session_state.setdefault("new_name", next(f"run-{i}" for i in range(1, len(taken) + 2) if f"run-{i}" not in taken))
    with st.form("new_run"):
        name = st.text_input("Run name", key="new_name")
        model = st.text_input(
            "Model (empty: the embedded SmolLM2-135M)", placeholder="local dir, .gguf or hub id", key="new_model",
            help="scores Stage 2; with the local backend it also rates (Stage 1) and writes A'",
        )  # fmt: skip
        rename = st.checkbox(
            "Keep records whose id repeats (rename them <id>#2, …)", value=True, key="new_rename",
            help="off: a repeated id stops the run with an error naming both records (the bundled MedQuAD sample has one)",
        )  # fmt: skip
        backend = st.radio("Stage 1 rating and A' generation", ["local", "openai"], horizontal=True, key="new_backend")
        c1, c2 = st.columns(2)
        base_url = c1.text_input("OpenAI-compatible base URL", placeholder="http://127.0.0.1:8000/v1 (default)", key="new_base_url")
        api_model = c2.text_input("Server model name", placeholder="the server's only model (default)", key="new_api_model")
        c1, c2, c3, c4, c5 = st.columns(5)
        threshold = c1.number_input("Quality threshold", 0.0, 100.0, 85.0, 1.0, key="new_threshold")
        low = c2.number_input("Band low %", 0.0, 100.0, 25.0, 1.0, key="new_low")
        up = c3.number_input("Band high %", 0.0, 100.0, 75.0, 1.0, key="new_up")
        sample_num = c4.number_input("sample_num", 1, 10_000_000, 5000, key="new_sample_num")
        atten = c5.selectbox("Attention", ["mean", "max"], key="new_atten")
        submitted = st.form_submit_button("Start run", type="primary", key="new_start")
    if not submitted:
        return
    problem = validate_new_run(name, data)
    if problem:
        st.error(problem)
        return
    server = {"base_url": base_url.strip() or BackendConfig.base_url, "api_model": api_model.strip() or None}
    config = RunConfig(
        data=DataConfig("rename" if rename else "error"), model=ModelConfig(model=model.strip() or None),
        backend=BackendConfig(backend=backend, **(server if backend == "openai" else {})),
        filter=FilterConfig(float(threshold)),
        select=SelectConfig(low_th=float(low), up_th=float(up), sample_num=int(sample_num), atten_method=atten),
    )  # fmt: skip
    out = common.cache_dir() / name
    argv = run_command(data, out, config)
    start_run(argv, out)
    common.switch_run(name)


def validate_new_run(name: str, data: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        return "Run name: letters, digits, '.', '_' and '-' only."
    if name in common.run_names() or name in NOT_RUNS:
        return f"A run named {name!r} exists; pick it in the sidebar (and resume it there) or choose another name."
    if not data or not Path(data).is_file():
        return f"Data file not found: {data or '(none chosen)'}"
    return None


def save_upload(upload) -> str:
    """Store an upload under cache/uploads/ so the background run can read it; the content hash
    in the name keeps a later upload of the same name from changing a running job's input."""
    data = upload.getbuffer()
    target = common.cache_dir() / "uploads" / f"{hashlib.sha256(data).hexdigest()[:12]}-{Path(upload.name).name}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return str(target)


navigation = st.navigation(
    [
        st.Page(runs_page, title="Runs", icon=":material/folder_open:", default=True),
        st.Page("app_pages/quality.py", title="Quality", icon=":material/star:"),
        st.Page("app_pages/difficulty.py", title="Difficulty", icon=":material/bar_chart:"),
        st.Page("app_pages/samples.py", title="Samples", icon=":material/table_rows:"),
        st.Page(common.INSPECTOR, title="Sample inspector", icon=":material/search:"),
        st.Page("app_pages/embedding_map.py", title="Embedding map", icon=":material/scatter_plot:"),
        st.Page("app_pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
        st.Page("app_pages/export.py", title="Export", icon=":material/download:"),
    ]
)
common.setup(navigation.url_path)
try:
    navigation.run()
finally:  # also after st.stop(): the URL always says what is shown
    common.write_url(navigation.url_path)
