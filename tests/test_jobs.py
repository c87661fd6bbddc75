"""Background runs: Stop escalates SIGINT -> SIGTERM -> SIGKILL to the process group and says which."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from threeds.errors import LockedError
from threeds.rundir.jobs import StopResult, job_running, start_run, stop_run
from threeds.rundir.progress import job_state, read_status

ROOT = Path(__file__).resolve().parents[1]

# A run that ignores the given signals, with a grandchild in its process group that does too.
STUBBORN = (
    "import signal, subprocess, sys, time, pathlib\n"
    "for name in sys.argv[2].split(','):\n"
    "    if name: signal.signal(getattr(signal, name), signal.SIG_IGN)\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import signal, time\\n'\n"
    "    + ''.join(f'signal.signal(signal.{n}, signal.SIG_IGN)\\n' for n in sys.argv[2].split(',') if n)\n"
    "    + 'time.sleep(600)'])\n"
    "pathlib.Path(sys.argv[1], 'child.pid').write_text(str(child.pid))\n"
    "time.sleep(600)\n"
)


def start_stubborn(run_dir: Path, ignores: str) -> tuple[int, int]:
    pid = start_run([sys.executable, "-c", STUBBORN, str(run_dir), ignores], run_dir)
    deadline = time.time() + 30
    while not (run_dir / "child.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the child has set its handlers
    return pid, int((run_dir / "child.pid").read_text())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # a zombie is gone too


@pytest.mark.parametrize(
    "ignores, signals",
    [("SIGINT", ("SIGINT", "SIGTERM")), ("SIGINT,SIGTERM", ("SIGINT", "SIGTERM", "SIGKILL"))],
)
def test_stop_escalates_until_the_whole_group_is_gone(tmp_path, ignores, signals):
    pid, grandchild = start_stubborn(tmp_path / "run", ignores)
    began = time.monotonic()
    result = stop_run(tmp_path / "run", grace=(0.5, 0.5, 5.0))
    assert result == StopResult(signals, stopped=True)
    assert result.message.startswith(f"stopped by {signals[-1]} after")
    assert time.monotonic() - began < 10
    assert not job_running(tmp_path / "run")
    deadline = time.time() + 5
    while not gone(grandchild) and time.time() < deadline:
        time.sleep(0.05)
    assert gone(pid) and gone(grandchild)


def test_a_plain_stop_is_one_sigint(tmp_path):
    start_run([sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "run")
    time.sleep(0.5)
    result = stop_run(tmp_path / "run")
    assert result == StopResult(("SIGINT",), stopped=True) and "saved" in result.message


def test_start_is_refused_while_another_process_holds_the_lock(tmp_path):
    hold = "import sys, time\nfrom threeds.io.lock import locked\nwith locked(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {proc.pid}"):
            start_run([sys.executable, "-c", "pass"], tmp_path / "run")
        assert not (tmp_path / "run" / "job.json").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


# A run that records its status as `threeds run` does (under the directory's lock), ignores the
# given signals, and on SIGINT records its own end.
RECORDING = (
    "import signal, sys, time\n"
    "from threeds.io.lock import locked\n"
    "from threeds.rundir.progress import write_status\n"
    "for name in sys.argv[2].split(','):\n"
    "    if name: signal.signal(getattr(signal, name), signal.SIG_IGN)\n"
    "with locked(sys.argv[1]):\n"
    "    write_status(sys.argv[1], 'running')\n"
    "    try:\n"
    "        time.sleep(600)\n"
    "    except KeyboardInterrupt:\n"
    "        write_status(sys.argv[1], 'stopped', exit_code=130, error='interrupted by the run itself')\n"
    "        sys.exit(130)\n"
)


def start_recording(run_dir: Path, ignores: str) -> int:
    pid = start_run([sys.executable, "-c", RECORDING, str(run_dir), ignores], run_dir, cwd=ROOT)
    deadline = time.time() + 30
    while read_status(run_dir) is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # inside the sleep, handlers set
    assert read_status(run_dir)["state"] == "running"
    return pid


@pytest.mark.parametrize(
    "ignores, code, error",
    [("SIGINT,SIGTERM", 137, "stopped by SIGKILL after SIGINT and SIGTERM went unheeded"),
     ("SIGINT", 143, "stopped by SIGTERM after SIGINT went unheeded"),
     ("", 130, "interrupted by the run itself")],  # a run that records its own end is left alone
)  # fmt: skip
def test_a_run_the_stop_button_killed_reads_stopped_and_says_which_signal(tmp_path, ignores, code, error):
    run_dir = tmp_path / "run"
    pid = start_recording(run_dir, ignores)
    assert job_state(read_status(run_dir), job_running(run_dir)) == "running"
    result = stop_run(run_dir, grace=(0.5, 0.5, 5.0))
    assert result.stopped
    status = read_status(run_dir)
    assert (status["state"], status["exit_code"], status["pid"]) == ("stopped", code, pid)
    assert status["error"].startswith(error)
    assert job_state(status, job_running(run_dir)) == "stopped"


def test_a_run_killed_from_outside_still_reads_killed(tmp_path):
    run_dir = tmp_path / "run"
    pid = start_recording(run_dir, "SIGINT,SIGTERM")
    os.killpg(pid, signal.SIGKILL)  # kill -9, not the app's Stop
    deadline = time.time() + 10
    while job_running(run_dir) and time.time() < deadline:
        time.sleep(0.05)
    assert job_state(read_status(run_dir), job_running(run_dir)) == "killed"
    assert stop_run(run_dir) == StopResult((), stopped=True)  # nothing left to stop: the status is not touched
    assert read_status(run_dir)["state"] == "running"
