"""Runs: the run table, one run's counts and progress, Stop and Resume, and the form that starts a new run."""

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
from threeds.config import (
    BackendConfig,
    DataConfig,
    FilterConfig,
    GenerateConfig,
    ModelConfig,
    RateConfig,
    RunConfig,
    SelectConfig,
    SubsetConfig,
    run_command,
)  # fmt: skip
from threeds.errors import ThreedsError
from threeds.rundir.jobs import job_running, log_tail, read_job, start_run, stop_run
from threeds.rundir.progress import eta_seconds, job_state, read_status
from threeds.rundir.read import NOT_RUNS, read_progress
from threeds.selection.funnel import stage_counts
from threeds.stages.rate import PROMPT_NAMES

SAMPLE_DATA = Path(threeds.__file__).parent / "sample_data"
DATA_TYPES = ["json", "jsonl", "parquet", "csv"]
# How a stopped run ended, by its recorded exit code (128 + signal): the CLI records SIGINT itself;
# the Stop button records SIGTERM or SIGKILL when it had to send them (`threeds.rundir.jobs.stop_run`).
STOP_SIGNALS = {130: "interrupted, SIGINT", 143: "ended by SIGTERM after SIGINT went unheeded", 137: "ended by SIGKILL after SIGINT and SIGTERM went unheeded"}
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
                "state": job_state(read_status(path), job_running(path)).replace("unknown", ""),
                "stage": progress.get("stage", ""),
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def show_run(run) -> None:
    st.header(f"Run {common.code(run.name)}")
    for file, problem in run.errors.items():
        st.error(common.md(problem))  # names the file
    # Re-drawn every 2 s while a background run works, without re-running the whole page.
    st.fragment(run_panel, run_every=2 if job_running(run.path) else None)(str(run.path))
    with st.expander("Manifest", expanded=False):
        if run.manifest:
            st.json(run.manifest)
        else:
            st.caption("No manifest.json yet.")


def run_panel(path: str) -> None:
    """The run's stage counts, progress, how it ended, Stop/Resume, its command and log."""
    run_dir = Path(path)
    running = job_running(run_dir)
    run = common.current_run()
    if run is not None:
        counts = list(stage_counts(run).items())
        for row in (counts[:4], counts[4:]):
            for col, (label, value) in zip(st.columns(4), row):
                col.metric(label, "—" if value is None else f"{value:,}")
    progress = read_progress(run_dir) or {}
    state = job_state(read_status(run_dir), running)
    if progress and progress.get("stage") != "done" and state in ("running", "unknown"):
        done, total = int(progress.get("done", 0)), int(progress.get("total", 0)) or 1
        st.progress(min(done / total, 1.0), text=progress_text(progress))
    elif progress and state in ("stopped", "failed", "killed"):
        st.caption(f"Reached {progress.get('stage', '?')}: {int(progress.get('done', 0)):,} / {int(progress.get('total', 0)):,} {progress.get('unit', '')}")
    job = read_job(run_dir)
    outcome(run_dir, state, job, progress.get("stage") == "done")
    if job is not None:
        with st.expander("Command and log", expanded=state != "done"):
            st.code(shlex.join(job["argv"]), language="bash", wrap_lines=True)
            st.code(log_tail(run_dir) or "(no output yet)", language=None, wrap_lines=True)
    was_running = st.session_state.setdefault("was_running", {})
    if was_running.get(path) and not running:
        was_running[path] = False
        st.rerun(scope="app")  # the run ended: reload its files on every element of the page
    was_running[path] = running


def progress_text(progress: dict) -> str:
    """'generate: 3 / 10 records · about 2 min left (updated 1 s ago)'."""
    done, total = int(progress.get("done", 0)), int(progress.get("total", 0))
    text = f"{progress.get('stage', '?')}: {done:,} / {total:,} {progress.get('unit', '')}".rstrip()
    eta = eta_seconds(progress)
    if eta is not None:
        text += f" · about {duration(eta)} left"
    return text + f" (updated {time.time() - float(progress.get('updated', time.time())):.0f} s ago)"


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def outcome(run_dir: Path, state: str, job: dict | None, finished: bool) -> None:
    """What the run's own status.json says (or, for older runs, what its files suggest)."""
    status = read_status(run_dir) or {}
    c1, c2 = st.columns([1, 5])
    if state == "running":
        c2.caption(f"Running in the background (pid {job['pid'] if job else '?'}); you can leave this page and come back.")
        if job is not None and c1.button("Stop", key="stop_run"):
            with st.spinner("Stopping (SIGINT, then SIGTERM, then SIGKILL if it does not stop)…"):
                st.session_state.setdefault("stopped", {})[str(run_dir)] = stop_run(run_dir).message
            st.rerun(scope="app")
        return
    stopped = st.session_state.get("stopped", {}).get(str(run_dir))
    if stopped:
        st.info(f"Stop: {stopped}")
    if state == "done":
        c2.success("Done: every stage finished.")
    elif state == "failed":
        c2.error(f"Failed (exit code {status.get('exit_code')}): {status.get('error') or 'see the log'}")
    elif state == "stopped":
        how = STOP_SIGNALS.get(status.get("exit_code"), "interrupted")
        c2.warning(f"Stopped by the user ({how}). Resume runs the same command again; finished work is kept.")
    elif state == "killed":
        c2.warning("Ended without recording how (killed?). Resume runs the same command again; finished work is kept.")
    elif job is not None and not finished:
        c2.caption("Stopped before the end. Resume runs the same command again; finished work is kept.")
    if job is not None and state != "done" and not (state == "unknown" and finished):
        if c1.button("Resume" if state != "failed" else "Run again", key="resume_run"):
            if start_background(job["argv"], run_dir):
                st.rerun(scope="app")


SUBSETS = {"first N records": "limit", "N random records": "sample", "all records": None}
PROMPT_AUTO = "auto (from the data's language)"


def start_form() -> None:
    st.header("Start a new run")
    data = data_choice()
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
        c1, c2, c3 = st.columns(3)
        subset = c1.selectbox("Records", list(SUBSETS), key="new_subset", help="start small: try the settings on a few records first")
        n = c2.number_input("N", 1, 100_000_000, 20, key="new_n")
        seed = c3.number_input("Random seed (N random records)", 0, 2**31 - 1, 0, key="new_sample_seed")
        backend = st.radio("Stage 1 rating and A' generation", ["local", "openai"], horizontal=True, key="new_backend")
        c1, c2 = st.columns(2)
        base_url = c1.text_input("OpenAI-compatible base URL", placeholder="http://127.0.0.1:8000/v1 (default)", key="new_base_url")
        api_model = c2.text_input("Server model name", placeholder="the server's only model (default)", key="new_api_model")
        c1, c2, c3, c4 = st.columns(4)
        prompt = c1.selectbox("Rating prompt", [PROMPT_AUTO, *PROMPT_NAMES], key="new_prompt",
                              help="auto: zh-medical (the paper's setting) for Chinese data, en-medical otherwise")  # fmt: skip
        max_new = c2.number_input("Max new tokens (A')", 1, 32768, GenerateConfig.max_new_tokens, key="new_max_new_tokens", help="longest A' in tokens")
        batch = c3.number_input("Batch size", 1, 4096, BackendConfig.batch_size, key="new_batch_size", help="local backend: prompts generated together")
        dtype = c4.selectbox("dtype", ["auto", "float32", "bfloat16"], key="new_dtype",
                             help="auto: float32 on CPU, bfloat16 on GPU")  # fmt: skip
        c1, c2, c3, c4, c5 = st.columns(5)
        threshold = c1.number_input("Quality threshold", 0.0, 100.0, FilterConfig.quality_threshold, 1.0, key="new_threshold")
        low = c2.number_input("Band low %", 0.0, 100.0, SelectConfig.low_th, 1.0, key="new_low")
        up = c3.number_input("Band high %", 0.0, 100.0, SelectConfig.up_th, 1.0, key="new_up")
        sample_num = c4.number_input("sample_num", 1, 10_000_000, SelectConfig.sample_num, key="new_sample_num")
        atten = c5.selectbox("Attention", ["mean", "max"], key="new_atten")
        submitted = st.form_submit_button("Start run", type="primary", key="new_start")
    if not submitted:
        return
    problem = validate_new_run(name, data)
    if problem:
        st.error(common.md(problem))
        return
    server = {"base_url": base_url.strip() or BackendConfig.base_url, "api_model": api_model.strip() or None}
    how = SUBSETS[subset]
    config = RunConfig(
        data=DataConfig("rename" if rename else "error"),
        subset=SubsetConfig(limit=int(n) if how == "limit" else None, sample=int(n) if how == "sample" else None,
                            sample_seed=int(seed) if how == "sample" else 0),
        model=ModelConfig(model=model.strip() or None, dtype=dtype),
        backend=BackendConfig(backend=backend, **(server if backend == "openai" else {"batch_size": int(batch)})),
        rate=RateConfig(prompt="auto" if prompt == PROMPT_AUTO else prompt),
        filter=FilterConfig(float(threshold)), generate=GenerateConfig(int(max_new)),
        select=SelectConfig(low_th=float(low), up_th=float(up), sample_num=int(sample_num), atten_method=atten),
    )  # fmt: skip
    out = common.cache_dir() / name
    if start_background(run_command(data, out, config), out):
        common.switch_run(name)


def start_background(argv: list[str], run_dir: Path) -> bool:
    """Start the run, or say in one line why not (another writer holds the run directory)."""
    try:
        start_run(argv, run_dir)
    except (ThreedsError, OSError) as exc:
        st.error(common.md(common.one_line_error(exc)))
        return False
    return True


def data_choice() -> str:
    """The data file chosen: bundled sample, upload or a path; '' when none yet."""
    # English first: the embedded model is English.
    samples = sorted((p.name for p in SAMPLE_DATA.glob("*") if p.suffix.lstrip(".") in DATA_TYPES), key=lambda n: ("_en" not in n, n))
    source = st.radio("Data", ["Sample data", "Upload", "Path on this machine"], horizontal=True, key="new_source")
    if source == "Sample data":
        if not samples:
            st.warning(f"No sample data found in {SAMPLE_DATA}.")
        choice = st.selectbox("Sample data set", samples, key="new_sample")
        return str(SAMPLE_DATA / choice) if choice else ""
    if source == "Upload":
        upload = st.file_uploader("Data set", type=DATA_TYPES, key="new_upload")
        return save_upload(upload) if upload else ""
    return st.text_input("Data file", key="new_path", placeholder="/path/to/data.jsonl")


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


runs_page()
