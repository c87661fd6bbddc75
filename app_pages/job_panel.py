"""The panel of a job started in the background, the same on the Runs page (a run) and on Outcomes
(an experiment): where it runs and Stop while it runs; once it ended, how (status.json, the Stop
button's own message for the job it stopped), Resume, the command and the log's tail; and a rerun of
the whole page when it ends, so every element shows its files."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from app_pages import common
from app_pages.new_run import start_background
from threeds.rundir.jobs import job_running, log_tail, read_job, stop_run
from threeds.rundir.progress import job_state, read_status

# How a stopped job ended, by its recorded exit code (128 + signal): the CLI records SIGINT itself;
# the Stop button records SIGTERM or SIGKILL when it had to send them (`threeds.rundir.jobs.stop_run`).
STOP_SIGNALS = {130: "interrupted, SIGINT", 143: "ended by SIGTERM after SIGINT went unheeded", 137: "ended by SIGKILL after SIGINT and SIGTERM went unheeded"}
STOPS = "job_stops"  # session: directory -> (pid of the job stopped, what Stop said)


@dataclass(frozen=True)
class Job:
    """A background job's directory, how it stands now (`job_state`), its status.json and job.json."""

    directory: Path
    running: bool
    state: str
    status: dict
    record: dict | None

    @property
    def pid(self) -> int | None:
        return self.record["pid"] if self.record else None


def job_of(directory: str | Path) -> Job:
    directory = Path(directory)
    running, status = job_running(directory), read_status(directory)
    return Job(directory, running, job_state(status, running), status or {}, read_job(directory))


Ended = Callable[[Job, DeltaGenerator], bool]  # a page's own words for an end (True: it said it)


def controls(job: Job, keys: tuple[str, str], kept: str, ended: Ended | None = None, resumable: bool = True) -> None:
    """Stop while it runs; once ended: what Stop said (for the job it stopped only), how it ended,
    and Resume (`keys`: the Stop and Resume buttons' keys; `kept`: what a Resume keeps)."""
    c1, c2 = st.columns([1, 5])
    stops = st.session_state.setdefault(STOPS, {})
    if job.running:
        c2.caption(f"Running in the background (pid {job.pid or '?'}); you can leave this page and come back.")
        if job.record is not None and c1.button("Stop", key=keys[0]):
            with st.spinner("Stopping (SIGINT, then SIGTERM, then SIGKILL if it does not stop)…"):
                stops[str(job.directory)] = (job.pid, stop_run(job.directory).message)
            st.rerun(scope="app")
        return
    stopped = stops.get(str(job.directory))
    if stopped and stopped[0] == job.pid:  # not a stale notice: a job started since has another pid
        st.info(f"Stop: {stopped[1]}")
    code = job.status.get("exit_code")
    if ended is not None and ended(job, c2):
        pass
    elif job.state == "failed":
        c2.error(f"Failed (exit code {code}): {common.md(job.status.get('error') or 'see the log')}")
    elif job.state == "stopped":
        c2.warning(f"Stopped by the user ({STOP_SIGNALS.get(code, 'interrupted')}). Resume runs the same command again; {kept}.")
    elif job.state == "killed":
        c2.warning(f"Ended without recording how (killed?). Resume runs the same command again; {kept}.")
    if resumable and job.record is not None and job.state != "done":
        label = {"failed": "Run again", "done_with_failures": "Retry failed"}.get(job.state, "Resume")
        if c1.button(label, key=keys[1]) and start_background(job.record["argv"], job.directory):
            stops.pop(str(job.directory), None)
            st.rerun(scope="app")


def command_and_log(job: Job, expanded: bool) -> None:
    if job.record is not None:
        with st.expander("Command and log", expanded=expanded):
            st.code(shlex.join(job.record["argv"]), language="bash", wrap_lines=True)
            st.code(log_tail(job.directory) or "(no output yet)", language=None, wrap_lines=True)


def rerun_when_ended(job: Job) -> None:
    """In the panel's fragment: once a job it saw running has ended, rerun the whole page."""
    was = st.session_state.setdefault("job_was_running", {})
    key = str(job.directory)
    if was.get(key) and not job.running:
        was[key] = False
        st.rerun(scope="app")
    was[key] = job.running
