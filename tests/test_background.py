"""k-center picks and A' flags made in the background (issue 30, item 4): no control waits for
them, the pages say they are coming, and what arrives is the library's.

The background path is taken on a small run by setting `pick_jobs.INLINE_WORK` to 0; the job is
held at a gate (a file the test creates) so "while the picks are pending" is a state, not a race.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from synthetic_run import make_run

from app_pages import pick_jobs
from app_pages import state as app_state
from threeds.config import SelectConfig
from threeds.rundir import layout
from threeds.rundir.read import load_run
from threeds.selection import pick_job
from threeds.selection.apply import apply, explain, filter_rows, quality_per_row

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120


@pytest.fixture()
def gated(tmp_path, monkeypatch):
    """A small run whose picks go to a background job that waits for the returned gate file."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("THREEDS_CACHE", str(cache))
    make_run(cache / "demo", n=300, n_dropped=10, dim=16)
    monkeypatch.setattr(pick_jobs, "INLINE_WORK", 0)
    gate = tmp_path / "go"
    real = pick_jobs.job_argv
    wait = 'while [ ! -e "$0" ]; do sleep 0.05; done; exec "$@"'
    monkeypatch.setattr(pick_jobs, "job_argv", lambda *args: ["sh", "-c", wait, str(gate), *real(*args)])
    return cache / "demo", gate


def open_page(page: str, **settings) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.session_state[app_state.SELECTION] = app_state.changed(at.session_state[app_state.SELECTION], **settings)
    at.switch_page(page).run()
    assert not at.exception, at.exception[0].value if at.exception else None
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def progress_texts(at: AppTest) -> str:
    return " ".join(p.proto.text for p in at.get("progress"))


def until(at: AppTest, done, what: str) -> None:
    """Rerun the page (as the pending panel's poll does) until `done(at)`."""
    deadline = time.time() + TIMEOUT
    while not done(at):
        assert time.time() < deadline, what
        time.sleep(0.2)
        at.run()
        assert not at.exception, at.exception[0].value


def test_controls_work_while_the_picks_are_pending_and_the_picks_are_the_librarys(gated):
    run_dir, gate = gated
    at = open_page("app_pages/export.py", sample_num=12)
    assert metric(at, "selected samples") == "coming"
    assert "The 12 k-center picks among" in progress_texts(at) and "are coming" in progress_texts(at)
    at.switch_page("app_pages/quality.py").run()  # a control while the job waits at its gate
    before = metric(at, "kept")
    at.slider(key=app_state.widget_key("quality_threshold")).set_value(95.0).run()
    assert metric(at, "kept") != before and not at.exception
    at.slider(key=app_state.widget_key("quality_threshold")).set_value(85.0).run()
    at.switch_page("app_pages/samples.py").run()  # the survivors meanwhile, each "pick pending"
    table = at.dataframe[0].value
    assert "pick pending" in set(table["verdict"]) and "picked" not in set(table["verdict"])
    at.switch_page("app_pages/export.py").run()
    assert metric(at, "selected samples") == "coming"
    gate.touch()
    until(at, lambda at: metric(at, "selected samples") != "coming", "the picks arrive")
    run = load_run(run_dir)
    config = SelectConfig(sample_num=12, quality_threshold=85.0)
    assert metric(at, "selected samples") == "12"
    assert at.table[0].value.reset_index()["id"].tolist() == apply(config, run.metrics, run.embeddings, run.ratings).picked_ids
    at.slider(key=app_state.widget_key("sample_num")).set_value(5).run()  # fewer: a slice, no job
    assert metric(at, "selected samples") == "5" and not at.get("progress")


def test_a_failed_job_is_named_on_the_page(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("THREEDS_CACHE", str(cache))
    make_run(cache / "demo", n=120, n_dropped=10, dim=8)
    monkeypatch.setattr(pick_jobs, "INLINE_WORK", 0)
    monkeypatch.setattr(pick_jobs, "job_argv", lambda *args: [sys.executable, "-c", "import sys; sys.exit('k-center picks: out of memory')"])
    at = open_page("app_pages/export.py", sample_num=7)
    until(at, lambda at: at.error, "the failure")
    assert at.error[0].value == "The k-center picks failed: k-center picks\\: out of memory"  # the job's line, as literal markdown


def test_the_job_writes_progress_and_the_greedy_picks(tmp_path):
    """The job itself, in process: picks equal the library's greedy, the order is kept in the run."""
    run_dir = make_run(tmp_path / "run", n=200, n_dropped=10, dim=12)
    run = load_run(run_dir)
    config = SelectConfig(sample_num=10)
    done = filter_rows(config, run.metrics, quality_per_row(run.ratings, run.metrics["id"]))
    assert len(done.candidates) > 10
    np.save(tmp_path / "c.npy", done.candidates)
    np.save(tmp_path / "i.npy", done.initial)
    argv = ["--run", str(run_dir), "--rows", str(len(run.metrics)), "--candidates", str(tmp_path / "c.npy"), "--initial", str(tmp_path / "i.npy"),
            "--k", "10", "--out", str(tmp_path / "p.npy"), "--progress", str(tmp_path / "progress.json"), "--nice", "0"]  # fmt: skip
    assert pick_job.main(argv) == 0  # --nice 0: in process, the test's own niceness stays
    picks = np.load(tmp_path / "p.npy")
    assert picks.tolist() == apply(config, run.metrics, run.embeddings, run.ratings).picked.tolist()
    progress = __import__("json").loads((tmp_path / "progress.json").read_text())
    assert (progress["stage"], progress["done"], progress["total"], progress["unit"]) == ("k-center", 10, 10, "picks")
    assert progress["done_at_start"] == 0 and progress["updated"] >= progress["started"]  # the pace from the picks' start
    assert len(list((run_dir / "pick_orders").glob("*.npy"))) == 1
    assert pick_job.main([*argv[:3], "999", *argv[4:]]) == 1  # embeddings of another length: one line, status 1


def test_the_job_yields_the_cpu_to_the_server_and_the_browser(tmp_path):
    """By default the job runs NICE steps nicer than the server that starts it, so on two cores a
    band move is not slowed by the picks of the move before."""
    import os
    import subprocess

    seen = tmp_path / "niceness"
    code = ("import os, sys, numpy as np; from threeds.selection import pick_job; "
            f"pick_job.make_picks = lambda *a: open({str(seen)!r}, 'w').write(str(os.nice(0))) and np.zeros(0, np.int64); "
            "sys.exit(pick_job.main(sys.argv[1:]))")  # fmt: skip
    np.save(tmp_path / "c.npy", np.zeros(0, np.int64))
    argv = ["--run", str(tmp_path), "--rows", "1", "--candidates", str(tmp_path / "c.npy"), "--initial", str(tmp_path / "c.npy"),
            "--k", "1", "--out", str(tmp_path / "p.npy"), "--progress", str(tmp_path / "progress.json")]  # fmt: skip
    subprocess.run([sys.executable, "-c", code, *argv], check=True, cwd=ROOT, timeout=TIMEOUT)
    assert int(seen.read_text()) == min(19, os.nice(0) + pick_job.NICE)


def test_pending_picks_have_their_own_verdict():
    """explain() without picks: every candidate "pick pending", the funnel counts the picks to come."""
    import pandas as pd

    metrics = pd.DataFrame({"id": [f"s{i}" for i in range(8)], **{c: np.arange(8.0) for c in ("ins_ppl", "gt_wloss_mean", "gt_wloss_max", "gen_wloss_mean", "gen_wloss_max")}})
    config = SelectConfig(sample_num=2, quality_threshold=None)
    done = filter_rows(config, metrics, None)
    chosen = explain(config, metrics, None, done, None)
    assert chosen.verdict.tolist() == ["dropped"] * 2 + ["pick pending"] * 4 + ["dropped"] * 2  # 25th-75th percentile of 0..7
    assert chosen.funnel["picked"] == 2 and chosen.picked.tolist() == []
    assert set(chosen.reason[2:6]) == {"in all bands; the k-center picks are being made"}


def test_the_difficulty_page_does_not_wait_for_a_large_runs_flags(tmp_path, monkeypatch):
    """Above INLINE_ROWS the flags on A' are computed in a thread: the page says so, the
    bands work meanwhile, and the counts appear once they are in."""
    import threading

    from app_pages import common
    from threeds.selection import answer_flags

    cache = tmp_path / "cache"
    monkeypatch.setenv("THREEDS_CACHE", str(cache))
    make_run(cache / "demo", n=150, n_dropped=10, dim=8)
    monkeypatch.setattr(common, "INLINE_ROWS", 0)
    gate, real = threading.Event(), answer_flags.run_answer_flags
    monkeypatch.setattr(common, "run_answer_flags", lambda *args: gate.wait(TIMEOUT) and real(*args))
    at = open_page("app_pages/difficulty.py")
    assert "Flagging the model's answers in the background" in " ".join(c.value for c in at.caption)
    before = metric(at, "in all three bands")
    at.slider(key=app_state.widget_key("band_ins_ppl")).set_value((40.0, 75.0)).run()
    assert metric(at, "in all three bands") != before and not at.exception
    gate.set()
    until(at, lambda at: any(m.label == "A' hit max-new-tokens" for m in at.metric), "the flag counts")
    run = load_run(cache / "demo")
    flags = real(run.path, run.metrics, run.records, run.manifest)
    assert metric(at, "A' hit max-new-tokens") == f"{flags.counts()['hit_max']:,}"


def test_the_samples_page_fills_in_a_large_runs_flags_when_they_arrive(tmp_path, monkeypatch):
    """The Samples table shows the rows at once and its A' flags column once the background
    flagging ends, without the user touching a control."""
    import threading

    from app_pages import common
    from threeds.selection import answer_flags

    cache = tmp_path / "cache"
    monkeypatch.setenv("THREEDS_CACHE", str(cache))
    make_run(cache / "demo", n=150, n_dropped=10, dim=8)
    run = load_run(cache / "demo")
    records = list(run.records)
    for row in (3, 7):  # two answers that repeat themselves: flagged
        records[row] = {**records[row], "generated_output": "word " * 600}
    (cache / "demo" / layout.DATA).write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(common, "INLINE_ROWS", 0)
    gate, real = threading.Event(), answer_flags.run_answer_flags
    monkeypatch.setattr(common, "run_answer_flags", lambda *args: gate.wait(TIMEOUT) and real(*args))
    at = open_page("app_pages/samples.py")
    assert "Flagging the model's answers in the background" in " ".join(c.value for c in at.caption)
    assert not at.dataframe[0].value["A' flags"].astype(bool).any()
    gate.set()
    until(at, lambda at: at.dataframe[0].value["A' flags"].astype(bool).any(), "the A' flags column")
    run = load_run(cache / "demo")
    want = real(run.path, run.metrics, run.records, run.manifest).labels()
    shown = at.dataframe[0].value.set_index("id")["A' flags"]
    assert shown.to_dict() == dict(zip(run.metrics["id"], want)), "every row's flags as computed"


def test_the_quality_page_does_not_wait_for_a_large_runs_sources(tmp_path, monkeypatch):
    """Above INLINE_ROWS the records' sources are read in a thread: the page says so, the threshold
    works meanwhile, and the breakdown by source appears once they are in, counted as by hand."""
    import threading

    from app_pages import common
    from threeds.rundir import sources

    cache = tmp_path / "cache"
    monkeypatch.setenv("THREEDS_CACHE", str(cache))
    run_dir = make_run(cache / "demo", n=150, n_dropped=10, dim=8)
    monkeypatch.setattr(common, "INLINE_ROWS", 0)
    gate, real = threading.Event(), sources.scored_sources
    monkeypatch.setattr(sources, "scored_sources", lambda *args: gate.wait(TIMEOUT) and real(*args))
    at = open_page("app_pages/quality.py")
    assert "Reading the sources of 160 records in the background" in " ".join(c.value for c in at.caption)
    before = metric(at, "kept")
    at.slider(key=app_state.widget_key("quality_threshold")).set_value(95.0).run()
    assert metric(at, "kept") != before and not at.exception
    gate.set()
    until(at, lambda at: len(at.table) > 0, "the table by source")
    source_of = {r["id"]: r["source"] for r in map(json.loads, (run_dir / "input.jsonl").read_text().splitlines())}
    ratings = [json.loads(line) for line in (run_dir / layout.RATINGS).read_text().splitlines()]
    shown = at.table[0].value
    for name in set(source_of.values()):
        mine = [r for r in ratings if source_of[r["id"]] == name]
        kept = sum(r["score"] is not None and r["score"] >= 95.0 for r in mine)
        assert (int(shown.loc[name, "rated"]), int(shown.loc[name, "kept"])) == (len(mine), kept), name


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own niceness is Linux's")
def test_background_threads_run_nicer_than_the_server():
    """Work the server does in the background (A' flags, sources) takes the CPU the pages leave:
    its thread runs BACKGROUND_NICE steps nicer than the thread that started it (capped at 19)."""
    import os

    from app_pages import common

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    seen = common.in_background(lambda: os.getpriority(os.PRIO_PROCESS, 0), "test").result(timeout=TIMEOUT)
    assert seen == min(19, mine + common.BACKGROUND_NICE) and os.getpriority(os.PRIO_PROCESS, 0) == mine
