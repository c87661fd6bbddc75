"""Background runs: Stop escalates SIGINT -> SIGTERM -> SIGKILL to the process group and says which."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import WAIT, wait_for

from threeds.cli import main
from threeds.errors import LockedError
from threeds.io.lock import holder
from threeds.rundir.jobs import STOP_SIGNALS, StopResult, job_running, start_run, stop_run
from threeds.rundir.progress import job_state, read_status

ROOT = Path(__file__).resolve().parents[1]
# A test run's script honours SIGINT as `threeds` does (threeds.cli.honour_interrupts): this suite may
# itself run with SIGINT ignored (started with `&` from a script), and its children inherit that.
HONOUR = "from threeds.cli import honour_interrupts; honour_interrupts(); "

IGNORED = 0.2  # the grace given a signal the run ignores: escalation does not depend on how long it is


def graces(ignores: str) -> tuple[float, ...]:
    """Short graces for the signals the run ignores, a generous one for the first it honours."""
    ignored = [name for name in ignores.split(",") if name]
    return tuple(IGNORED if sig.name in ignored else WAIT for sig in STOP_SIGNALS)


# A run that ignores the given signals, with a child in its process group that does too; the
# child writes child.pid once its handlers are set.
STUBBORN = (
    "import signal, subprocess, sys, time\n"
    "for name in sys.argv[2].split(','):\n"
    "    if name: signal.signal(getattr(signal, name), signal.SIG_IGN)\n"
    "subprocess.Popen([sys.executable, '-c', 'import os, pathlib, signal, sys, time\\n'\n"
    "    + ''.join(f'signal.signal(signal.{n}, signal.SIG_IGN)\\n' for n in sys.argv[2].split(',') if n)\n"
    "    + 'pathlib.Path(sys.argv[1], \"child.tmp\").write_text(str(os.getpid()))\\n'\n"
    "    + 'os.replace(pathlib.Path(sys.argv[1], \"child.tmp\"), pathlib.Path(sys.argv[1], \"child.pid\"))\\n'\n"
    "    + 'time.sleep(600)', sys.argv[1]])\n"
    "time.sleep(600)\n"
)


def start_stubborn(run_dir: Path, ignores: str) -> tuple[int, int]:
    pid = start_run([sys.executable, "-c", STUBBORN, str(run_dir), ignores], run_dir)
    wait_for((run_dir / "child.pid").exists, "the child's handlers set")
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
    result = stop_run(tmp_path / "run", grace=graces(ignores))
    assert result == StopResult(signals, stopped=True)
    assert result.message.startswith(f"stopped by {signals[-1]} after")
    assert not job_running(tmp_path / "run")
    wait_for(lambda: gone(grandchild), "the grandchild gone")
    assert gone(pid)


def test_a_plain_stop_is_one_sigint(tmp_path):
    # up once Python runs the script: a SIGINT sent between fork and exec would be taken by the parent's handler and lost
    start_run([sys.executable, "-c", f"{HONOUR}import pathlib, sys, time; pathlib.Path(sys.argv[1], 'up').touch(); time.sleep(600)",
               str(tmp_path / "run")], tmp_path / "run")  # fmt: skip
    wait_for((tmp_path / "run" / "up").exists, "the run started")
    result = stop_run(tmp_path / "run", grace=(WAIT, WAIT, WAIT))
    assert result == StopResult(("SIGINT",), stopped=True) and "saved" in result.message


def test_start_is_refused_while_another_process_holds_the_lock(tmp_path):
    hold = "import sys, time\nfrom threeds.io.lock import locked\nwith locked(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n"
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
# given signals, and on SIGINT records its own end. It imports numpy (through threeds), so it has
# more than one thread, as every real run has; with a third argument its main thread exits at once,
# leaving the process to its other thread (a killed process passes through that state as its
# threads exit one by one: the lock is held until the last one has).
RECORDING = (
    HONOUR + "\n"
    "import ctypes, platform, signal, sys, threading, time\n"
    "from threeds.io.lock import locked\n"
    "from threeds.rundir.progress import write_status\n"
    "for name in sys.argv[2].split(','):\n"
    "    if name: signal.signal(getattr(signal, name), signal.SIG_IGN)\n"
    "with locked(sys.argv[1]):\n"
    "    try:\n"
    "        if sys.argv[3:]:\n"
    "            threading.Thread(target=time.sleep, args=(600,)).start()\n"
    "            write_status(sys.argv[1], 'running')\n"
    "            ctypes.CDLL(None).syscall({'x86_64': 60, 'aarch64': 93}[platform.machine()], 0)  # exit(2): this thread only\n"
    "        write_status(sys.argv[1], 'running')\n"
    "        time.sleep(600)\n"
    "    except KeyboardInterrupt:\n"
    "        write_status(sys.argv[1], 'stopped', exit_code=130, error='interrupted by the run itself')\n"
    "        sys.exit(130)\n"
)


def start_recording(run_dir: Path, ignores: str, *extra: str) -> int:
    """Started, with its handlers set (its status says `running` inside the `try`)."""
    pid = start_run([sys.executable, "-c", RECORDING, str(run_dir), ignores, *extra], run_dir, cwd=ROOT)
    wait_for(lambda: read_status(run_dir) is not None, "status.json written")
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
    result = stop_run(run_dir, grace=graces(ignores))
    assert result.stopped
    status = read_status(run_dir)
    assert (status["state"], status["exit_code"], status["pid"]) == ("stopped", code, pid)
    assert status["error"].startswith(error)
    assert job_state(status, job_running(run_dir)) == "stopped"


def test_a_run_killed_from_outside_still_reads_killed(tmp_path):
    run_dir = tmp_path / "run"
    pid = start_recording(run_dir, "SIGINT,SIGTERM")
    os.killpg(pid, signal.SIGKILL)  # kill -9, not the app's Stop
    wait_for(lambda: not job_running(run_dir), "the killed run gone")
    assert job_state(read_status(run_dir), job_running(run_dir)) == "killed"
    assert stop_run(run_dir) == StopResult((), stopped=True)  # nothing left to stop: the status is not touched
    assert read_status(run_dir)["state"] == "running"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="exit(2) of one thread through its syscall number")
def test_a_process_whose_main_thread_is_a_zombie_is_alive_until_its_last_thread_exits(tmp_path):
    """The race the Stop button lost on a busy machine: a killed multi-threaded run showed its main
    thread as a zombie while another thread still held its files, the lock among them; the stopper
    took the group for gone, could not take the lock and left status.json at `running`."""
    run_dir = tmp_path / "run"
    pid = start_recording(run_dir, "SIGINT,SIGTERM", "main-thread-exits")
    wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", "the main thread a zombie")
    assert holder(run_dir) == pid and job_running(run_dir)  # its other thread holds the lock
    result = stop_run(run_dir, grace=graces("SIGINT,SIGTERM"))
    assert result == StopResult(("SIGINT", "SIGTERM", "SIGKILL"), stopped=True)  # not taken for gone after SIGINT
    status = read_status(run_dir)
    assert (status["state"], status["exit_code"], status["pid"]) == ("stopped", 137, pid)
    assert holder(run_dir) is None


def test_the_command_line_honours_sigint_when_started_with_it_ignored(capsys):
    """A run started in the background of a script inherits SIGINT ignored; Stop's SIGINT must still
    reach it as KeyboardInterrupt (it saves its work), not wait for SIGTERM."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        main([])  # prints the help: any command line takes SIGINT back first
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
