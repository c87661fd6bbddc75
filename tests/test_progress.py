"""threeds.rundir.progress: progress.json writes, the time-left estimate, status.json, terminal logs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from threeds.errors import ThreedsError
from threeds.io.lock import holder
from threeds.outcomes import pace
from threeds.rundir import layout, lifecycle
from threeds.rundir import progress as pg

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def read(path) -> dict:
    return json.loads((path / layout.PROGRESS).read_text())


def test_progress_file_rate_limits_writes_but_never_ends_behind(tmp_path):
    clock = Clock()
    bar = pg.ProgressFile(tmp_path / layout.PROGRESS, "generate", total=10, done=4, min_interval=0.5, clock=clock)
    assert read(tmp_path) == {"stage": "generate", "done": 4, "total": 10, "unit": "records", "started": 1000.0,
                              "done_at_start": 4, "updated": 1000.0, "phase": "generate", "phase_since": 1000.0, "ahead": []}  # fmt: skip
    clock.t = 1000.2
    bar.update(5)
    assert read(tmp_path)["done"] == 4  # within 0.5 s of the last write: not written
    clock.t = 1000.6
    bar.update(6)
    assert read(tmp_path)["done"] == 6 and read(tmp_path)["updated"] == 1000.6
    clock.t = 1000.7
    bar.update(7)
    bar.close()  # the last count is always written
    assert read(tmp_path)["done"] == 7 and read(tmp_path)["updated"] == 1000.7


def test_phase_line_from_the_first_second_and_the_pace_from_the_stage_own_phase(tmp_path):
    """Issue 25: 'rate: 0 / 10 (updated 384 s ago)' for 9.5 minutes became a line that moves."""
    clock = Clock()
    bar = pg.ProgressFile(tmp_path / layout.PROGRESS, "rate", total=10, clock=clock)
    bar.phase("loading the model")  # written at once, whatever the rate limit
    assert pg.phase_line(read(tmp_path), now=1040.0) == "loading the model, 40 s so far"
    clock.t = 1300.0
    bar.phase("rate")
    assert pg.phase_line(read(tmp_path), now=1340.0) == "rating record 1 of 10, 40 s so far"
    clock.t = 1320.0
    bar.update(2, force=True)
    state = read(tmp_path)
    assert pg.phase_line(state, now=1425.0) == "rating record 3 of 10, 2 min 5 s so far"
    assert pg.eta_seconds(state) == pytest.approx(80.0)  # 2 records in the 20 s since loading: 8 left
    assert pg.phase_line({"stage": "rate", "done": 1, "total": 2}, now=0.0) is None  # an older progress.json


def test_whole_run_time_left_adds_the_stages_ahead_at_their_measured_pace(tmp_path):
    path = tmp_path / layout.PROGRESS
    pg.set_ahead(path, [{"stage": "generate", "units": 8, "seconds_per_unit": 15.0},
                        {"stage": "score", "units": 16, "seconds_per_unit": None}])  # fmt: skip
    clock = Clock()
    bar = pg.ProgressFile(path, "rate", total=10, clock=clock)  # keeps the stages ahead
    clock.t = 1020.0
    bar.update(4, force=True)  # 5 s a record: 30 s left in rating, then 8 x 15 s of A'
    assert pg.run_time_left(read(tmp_path)) == (pytest.approx(150.0), ["score"])
    assert pg.ProgressFile(path, "score", total=16, ahead=[]).state["ahead"] == []


def test_progress_file_writes_a_held_back_count_at_the_end_of_the_interval(tmp_path, monkeypatch):
    """A burst (a local batch finishing at once): the last count is not left waiting for the next
    record; a timer set for the end of the interval writes it. The clock and the timer are the
    test's, so a busy machine cannot let the interval pass during the burst."""
    timers = []

    class Timer:
        def __init__(self, interval, function):
            self.interval, self.function, self.daemon, self.cancelled = interval, function, False, False
            timers.append(self)

        def start(self):
            pass

        def cancel(self):
            self.cancelled = True

    monkeypatch.setattr(pg.threading, "Timer", Timer)
    now = [100.0]
    bar = pg.ProgressFile(tmp_path / layout.PROGRESS, "generate", total=8, min_interval=0.2, clock=lambda: now[0])
    now[0] = 100.05
    for done in range(1, 9):
        bar.update(done)
    assert read(tmp_path)["done"] == 0  # held back: within 0.2 s of the first write
    assert len(timers) == 1 and timers[0].interval == pytest.approx(0.15)  # one timer, for the end of the interval
    now[0] = 100.2
    timers[0].function()
    assert read(tmp_path)["done"] == 8 and read(tmp_path)["updated"] == 100.2 and bar.pending is None
    now[0] = 100.5
    bar.update(9)  # past the interval: written at once, no timer
    assert read(tmp_path)["done"] == 9 and len(timers) == 1


def test_eta_from_the_records_done_in_this_run():
    # 30 records done in 30 s since the stage started at 10 (resumed): 60 left -> 60 s
    state = {"stage": "rate", "done": 40, "total": 100, "started": 100.0, "updated": 130.0, "done_at_start": 10}
    assert pg.eta_seconds(state) == pytest.approx(60.0)
    assert pg.eta_seconds({**state, "done": 10}) is None  # nothing new yet
    assert pg.eta_seconds({**state, "done": 100}) == 0.0
    assert pg.eta_seconds({"stage": "rate", "done": 3, "total": 10, "updated": 5.0}) is None  # older file: no start


def test_eta_of_a_real_progress_file(tmp_path):
    clock = Clock(0.0)
    bar = pg.ProgressFile(tmp_path / layout.PROGRESS, "generate", total=8, min_interval=0, clock=clock)
    for done in range(1, 3):
        clock.t += 2.0  # one record every 2 s
        bar.update(done)
    assert pg.eta_seconds(read(tmp_path)) == pytest.approx(6 * 2.0)


def test_one_report_to_the_terminal_bar_and_the_progress_file(tmp_path):
    """The two adapters of `Progress` fed one sequence: 2 of 5 records done before (a resumed stage),
    then 3, then 5. The bar starts at 2 and ends at 5 of 5; progress.json counts the pace from the
    first report (its time and count), so the 2 resumed records are not part of it."""
    clock = Clock(50.0)
    file = pg.ProgressFile(tmp_path / layout.PROGRESS, "rate", total=0, min_interval=0, clock=clock)
    bar, err = pg.TerminalBar("rate", "rec"), io.StringIO()
    report = pg.fan_out(bar, file)
    with contextlib.redirect_stderr(err):
        clock.t = 60.0
        report(2, 5)
        start = err.getvalue()
        clock.t = 64.0
        report(3, 5)
        report(5, 5)
        bar.close()
    assert "rate:  40%" in start and "2/5" in start
    assert pg.terminal_text(err.getvalue()).strip().startswith("rate: 100%") and "5/5" in err.getvalue()
    state = read(tmp_path)
    assert (state["done"], state["total"], state["done_at_start"], state["started"], state["updated"]) == (5, 5, 2, 60.0, 64.0)
    assert "work" not in state
    quiet = pg.TerminalBar("rate", "rec", enabled=False)
    with contextlib.redirect_stderr(err := io.StringIO()):
        quiet(1, 2)
        quiet.close()
    assert err.getvalue() == ""


def test_the_bar_over_the_work_names_the_items():
    bar, err = pg.TerminalBar("eval", "items"), io.StringIO()
    with contextlib.redirect_stderr(err):
        bar(0, 4, 0, 130)
        bar(1, 4, 100, 130)
        bar.close()
    last = pg.terminal_text(err.getvalue()).strip().splitlines()[-1]
    assert last.startswith("eval:  77%") and "100/130" in last and "tok" in last and "1/4 items" in last


def test_eta_from_the_work_done_not_the_items(tmp_path):
    """Items of 100, 10, 10 and 10 tokens, the longest first (as an evaluation runs them): 10 s after
    the start the first is done, 30 of the 130 tokens are left: 3 s left (30/100 of the time spent),
    not the 30 s that 3 items left at 10 s an item would say. The experiment's time left (no
    evaluation finished yet) counts the running one the same way."""
    clock = Clock(0.0)
    file = pg.ProgressFile(tmp_path / layout.PROGRESS, "sel/seed0 eval", total=4, unit="items", min_interval=0, clock=clock)
    file(0, 4, 0, 130)
    clock.t = 10.0
    file(1, 4, 100, 130)
    state = read(tmp_path)
    assert pg.eta_seconds(state) == pytest.approx(3.0)
    assert pg.eta_seconds({k: v for k, v in state.items() if not k.startswith("work")}) == pytest.approx(30.0)  # by items
    assert pg.units_left(state) == pytest.approx(4 * 30 / 130) and pg.seconds_per_unit(state) == pytest.approx(10 / (4 * 100 / 130))
    units = {"sel/seed0": {"records": None, "train": "none", "eval": "running"}}
    assert pace.time_left({}, units, state) == pace.TimeLeft(pytest.approx(3.0), ())
    clock.t = 11.0
    file(2, 4, 110, 130)  # 10 more tokens in 1 s: 20 left at 110 tokens in 11 s
    assert pg.eta_seconds(read(tmp_path)) == pytest.approx(2.0)


def test_status_written_and_read_back(tmp_path):
    assert pg.read_status(tmp_path) is None
    pg.write_status(tmp_path, "failed", exit_code=1, error="DataError: data.jsonl line 3: not JSON")
    status = pg.read_status(tmp_path)
    assert status["state"] == "failed" and status["exit_code"] == 1 and status["error"].endswith("not JSON")
    with pytest.raises(ValueError, match="state"):
        pg.write_status(tmp_path, "finished")
    (tmp_path / layout.STATUS).write_text('{"state": "runn')  # torn
    assert pg.read_status(tmp_path) is None


@pytest.mark.parametrize(
    ("status", "running", "state"),
    [
        ({"state": "running"}, True, "running"),
        ({"state": "running"}, False, "killed"),  # recorded as running, no process left
        ({"state": "done"}, False, "done"),
        ({"state": "stopped"}, False, "stopped"),
        ({"state": "failed"}, False, "failed"),
        (None, False, "unknown"),
        (None, True, "running"),
    ],
)
def test_job_state(status, running, state):
    assert pg.job_state(status, running) == state


def test_terminal_text_by_hand():
    raw = "INFO \x1b[1;31mred\x1b[0m\n\r  0%|     | 0/3\r 33%|#    | 1/3\r100%|#####| 3/3\x1b[K\nwarn\x08ing\x1b]0;title\x07 end\n"
    assert pg.terminal_text(raw) == "INFO red\n100%|#####| 3/3\nwarning end\n"


def test_terminal_text_of_a_real_tqdm_bar():
    buffer = io.StringIO()
    with tqdm(total=3, file=buffer, desc="generate", ncols=60, mininterval=0) as bar:
        for _ in range(3):
            bar.update()
    raw = buffer.getvalue()
    assert "\r" in raw
    shown = pg.terminal_text(raw)
    assert "\r" not in shown and "\x1b" not in shown
    assert shown.strip().startswith("generate: 100%") and "3/3" in shown and shown.count("generate") == 1


@pytest.mark.parametrize(
    "raised, state, code",
    [(None, "done", 0), ("ending", "done_with_failures", 3), (KeyboardInterrupt(), "stopped", 130),
     (ThreedsError("bad record"), "failed", 1)],
)  # fmt: skip
def test_run_lifecycle_records_running_then_the_end_inside_the_lock(tmp_path, monkeypatch, raised, state, code):
    """One lifecycle for runs and experiments: every status.json write happens while this process
    holds the directory's lock (a Stop's record or a Resume never sees the lock free and `running`)."""
    written = []
    real = lifecycle.write_status

    def recording(directory, state, **kw):
        written.append((state, holder(directory) == os.getpid()))
        real(directory, state, **kw)

    monkeypatch.setattr(lifecycle, "write_status", recording)
    with contextlib.suppress(KeyboardInterrupt, ThreedsError):
        with lifecycle.run_lifecycle(tmp_path / "run") as ending:
            assert pg.read_status(tmp_path / "run")["state"] == "running"
            if raised == "ending":
                ending.state, ending.exit_code, ending.error, ending.failures = "done_with_failures", 3, "2 failed", {"rate": {"failed": 2}}
            elif raised is not None:
                raise raised
    assert written == [("running", True), (state, True)]
    status = pg.read_status(tmp_path / "run")
    assert (status["state"], status["exit_code"]) == (state, code) and holder(tmp_path / "run") is None
    if raised == "ending":
        assert status["error"] == "2 failed" and status["failures"] == {"rate": {"failed": 2}}
    if isinstance(raised, ThreedsError):
        assert status["error"] == "bad record"


def test_experiment_time_left_by_hand():
    """Steps and items at their own paces; work whose pace is unknown is named, not guessed."""
    described = {"train": {"batch_size": 2, "grad_accum": 2, "epochs": 3}}
    assert pace.planned_steps(described, 10) == 9 and pace.planned_steps(described, None) == 0  # 3 x ceil(10 / 4)
    units = {"sel/seed0": {"records": 10, "train": "running"}, "rand/seed0": {"records": 4}, "base/seed0": {"records": None, "train": "none"}}
    # the first unit's first step: 2 steps done in 20 s since the stage began -> 10 s a step
    progress = {"stage": "sel/seed0 train", "done": 2, "total": 9, "done_at_start": 0, "started": 100.0, "updated": 120.0}
    left = pace.time_left(described, units, progress)
    assert left == pace.TimeLeft((7 + 3) * 10.0, ("eval",))  # 7 steps of sel, 3 of rand; no evaluation measured yet
    assert pace.time_left(described, units, {**progress, "done": 0, "updated": 100.0}) is None  # no pace yet
    # sel trained (9 steps in 90 s) and evaluated (50 items in 25 s); rand evaluating: 10 of 50 items
    units = {"sel/seed0": {"records": 10, "train": "done", "train_s": 90.0, "steps": 9, "eval": "done", "eval_s": 25.0, "n_items": 50},
             "rand/seed0": {"records": 4, "train": "done", "train_s": 30.0, "steps": 3, "eval": "running"},
             "base/seed0": {"records": None, "train": "none"}}  # fmt: skip
    progress = {"stage": "rand/seed0 eval", "done": 10, "total": 50, "done_at_start": 0, "started": 0.0, "updated": 5.0}
    assert pace.time_left(described, units, progress) == pace.TimeLeft((40 + 50) * 25.0 / 50, ())  # rand's 40 + base's 50


def test_the_outcomes_page_reads_an_experiment_without_torch():
    """First paint: the Outcomes page's reading of an experiment (`threeds.outcomes.results`, the
    statistics' report, the pace) imports no torch; `threeds.outcomes.experiment` (the runner) does."""
    code = ("import sys\nimport threeds.outcomes.results, threeds.outcomes.report, threeds.outcomes.pace, threeds.outcomes.arms\n"
            "print('torch' in sys.modules)\nimport threeds.outcomes.experiment\nprint('torch' in sys.modules)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.stdout.split() == ["False", "True"], out.stderr[-2000:]
