"""Runs: the run table, one run's counts and progress, Stop and Resume, and the form that starts a new run."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages import common
from app_pages.new_run import start_background, start_form
from threeds.rundir import layout
from threeds.rundir.jobs import job_running, log_tail, read_job, stop_run
from threeds.rundir.progress import job_state, phase_line, read_status
from threeds.rundir.read import read_progress
from threeds.selection.funnel import stage_counts
from threeds.stages.joblog import failed_rows
from threeds.stages.outcome import failure_counts

# How a stopped run ended, by its recorded exit code (128 + signal): the CLI records SIGINT itself;
# the Stop button records SIGTERM or SIGKILL when it had to send them (`threeds.rundir.jobs.stop_run`).
STOP_SIGNALS = {130: "interrupted, SIGINT", 143: "ended by SIGTERM after SIGINT went unheeded", 137: "ended by SIGKILL after SIGINT and SIGTERM went unheeded"}
STAGE_FILES = [layout.RATINGS, layout.METRICS, layout.EMBEDDINGS, layout.TOKENS, layout.SELECTION]


# The path through a run's pages, in the order a first look takes (the header's links).
TOUR = [("app_pages/quality.py", "Quality"), ("app_pages/difficulty.py", "Difficulty"),
        ("app_pages/samples.py", "Samples"), ("app_pages/export.py", "Export")]  # fmt: skip


def runs_page() -> None:
    st.title("Runs")
    guide()
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


def guide() -> None:
    """What 3DS does, where to look next and where a new run starts: a first visit lands here."""
    st.markdown(
        "**3DS picks the samples worth fine-tuning a model on.** It rates each record's quality, measures how "
        "hard each one is for *your* model (three difficulty metrics from its own losses and attention), and "
        "keeps a diverse set of the middling-hard ones: not too easy to teach anything, not too hard to learn."
    )
    st.markdown("Look at a run in this order; each page's settings carry over to the next:")
    for col, (page, title) in zip(st.columns([1, 1, 1, 1, 3]), TOUR):
        col.page_link(page, label=title, icon=":material/arrow_forward:")
    st.markdown("A new run starts at [**Start a new run**](#start-a-new-run), below the run's details.")


def run_table(names: list[str]) -> None:
    rows = []
    for name in names:
        path = common.cache_dir() / name
        progress = read_progress(path) or {}
        rows.append(
            {
                "run": name,
                **{f: (path / f).exists() for f in STAGE_FILES},
                "state": state_words(read_status(path), job_running(path)),
                "stage": progress.get("stage", ""),
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


STATE_WORDS = {"running": "running", "done": "done", "done_with_failures": "done with failures", "failed": "failed",
               "stopped": "stopped by the user", "killed": "ended without saying how (killed?)", "unknown": ""}  # fmt: skip


def state_words(status: dict | None, running: bool) -> str:
    """How the run ended, in words for the run list (an empty selection is done, with nothing selected)."""
    state = job_state(status, running)
    if state == "done" and (status or {}).get("exit_code"):
        return "done, nothing selected"
    return STATE_WORDS.get(state, state)


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
        st.progress(min(done / total, 1.0), text=common.progress_text(progress))
        line = phase_line(progress, time.time()) if state == "running" else None
        if line:
            st.caption(f"Now: {line}")
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
    if state == "done" and not status.get("exit_code"):
        c2.success("Done: every stage finished.")
    elif state == "done":  # every stage finished, but with nothing selected
        c2.warning(f"Done (exit code {status.get('exit_code')}): {status.get('error') or 'see the log'}")
    elif state == "done_with_failures":
        counts = failure_counts(status.get("failures") or {}) or "some records failed"
        c2.warning(f"Done with failures (exit code {status.get('exit_code')}): {counts}. Retry runs the same command "
                   "again and asks the failed records only.")  # fmt: skip
        if status.get("retry_error"):
            st.warning(f"The last retry stopped before it fixed them: {common.md(status['retry_error'])}")
        failed_records(status.get("failures") or {})
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
        label = {"failed": "Run again", "done_with_failures": "Retry failed"}.get(state, "Resume")
        if c1.button(label, key="resume_run"):
            if start_background(job["argv"], run_dir):
                st.rerun(scope="app")


def failed_records(failures: dict) -> None:
    """The first failed records of each stage with their error, and every one of them on demand."""
    first = [{"stage": stage, **row} for stage, f in failures.items() for row in f.get("first", [])]
    if first:
        st.dataframe(pd.DataFrame(first), hide_index=True, width="stretch")
    for stage, f in failures.items():
        path = Path(f.get("log", ""))
        with st.expander(f"All {f.get('failed', 0):,} failed records of {stage} ({path.name})"):
            rows = failed_rows(path)
            if rows:
                st.dataframe(pd.DataFrame(rows)[[c for c in ("id", "error", "raw", "attempts") if c in rows[0]]],
                             hide_index=True, width="stretch")  # fmt: skip
            else:
                st.caption(f"None left in {common.code(str(path))}: a later run asked them again.")


runs_page()
