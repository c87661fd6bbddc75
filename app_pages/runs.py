"""Runs: the run table, one run's counts and progress, Stop and Resume, and the form that starts a new run."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages import common, job_panel
from app_pages.new_run import start_form
from threeds.rundir import layout
from threeds.rundir.jobs import job_running
from threeds.rundir.progress import job_state, phase_line, read_status
from threeds.rundir.read import read_progress
from threeds.selection.funnel import stage_counts
from threeds.stages.joblog import failed_rows
from threeds.stages.outcome import failure_counts

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
    job = job_panel.job_of(path)
    run = common.current_run()
    if run is not None:
        counts = list(stage_counts(run).items())
        for row in (counts[:4], counts[4:]):
            for col, (label, value) in zip(st.columns(4), row):
                col.metric(label, "—" if value is None else f"{value:,}")
    progress = read_progress(job.directory) or {}
    if progress and progress.get("stage") != "done" and job.state in ("running", "unknown"):
        done, total = int(progress.get("done", 0)), int(progress.get("total", 0)) or 1
        st.progress(min(done / total, 1.0), text=common.progress_text(progress))
        line = phase_line(progress, time.time()) if job.state == "running" else None
        if line:
            st.caption(f"Now: {line}")
    elif progress and job.state in ("stopped", "failed", "killed"):
        st.caption(f"Reached {progress.get('stage', '?')}: {int(progress.get('done', 0)):,} / {int(progress.get('total', 0)):,} {progress.get('unit', '')}")
    finished = progress.get("stage") == "done"
    job_panel.controls(job, ("stop_run", "resume_run"), "finished work is kept", ended=functools.partial(run_ended, finished=finished),
                       resumable=not (job.state == "unknown" and finished))  # fmt: skip
    job_panel.command_and_log(job, expanded=job.state != "done")
    job_panel.rerun_when_ended(job)  # the run ended: reload its files on every element of the page


def run_ended(job: job_panel.Job, c2, finished: bool) -> bool:
    """A run's own ends (done, done with failures; an older run's files); the shared ones otherwise."""
    status, code = job.status, job.status.get("exit_code")
    if job.state == "done" and not code:
        c2.success("Done: every stage finished.")
    elif job.state == "done":  # every stage finished, but with nothing selected
        c2.warning(f"Done (exit code {code}): {common.md(status.get('error') or 'see the log')}")
    elif job.state == "done_with_failures":
        counts = failure_counts(status.get("failures") or {}) or "some records failed"
        c2.warning(f"Done with failures (exit code {code}): {counts}. Retry runs the same command "
                   "again and asks the failed records only.")  # fmt: skip
        if status.get("retry_error"):
            st.warning(f"The last retry stopped before it fixed them: {common.md(status['retry_error'])}")
        failed_records(status.get("failures") or {})
    elif job.state == "unknown" and job.record is not None and not finished:
        c2.caption("Stopped before the end. Resume runs the same command again; finished work is kept.")
    else:
        return False
    return True


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
