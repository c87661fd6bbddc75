"""The run directory lock: one writer, the holder's pid in the refusal, no stale lock after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from threeds.errors import LOCKED, LockedError, ThreedsError
from threeds.io.lock import LOCK_FILE, holder, locked

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time\n"
    "from threeds.io.lock import locked\n"
    "with locked(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


def hold_in_child(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_with_the_holders_pid_and_a_killed_holder_never_blocks(tmp_path):
    proc = hold_in_child(tmp_path / "run")
    try:
        assert holder(tmp_path / "run") == proc.pid
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(proc.pid)
        with pytest.raises(LockedError, match=f"pid {proc.pid}") as caught:
            with locked(tmp_path / "run"):
                pass
        assert caught.value.exit_code == LOCKED
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert holder(tmp_path / "run") is None  # the lock file stays, the lock does not
    with locked(tmp_path / "run"):
        assert holder(tmp_path / "run") is not None


def test_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    with locked(tmp_path / "run"):
        with locked(tmp_path / "run"):  # e.g. `run` holding it while its scoring stage takes it too
            pass
        proc = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 1 and "LockedError" in proc.stderr
    assert holder(tmp_path / "run") is None
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""  # no stale pid left to show


def test_an_existing_run_is_required_when_asked(tmp_path):
    with pytest.raises(ThreedsError, match="no such run directory"):
        with locked(tmp_path / "missing", create=False):
            pass
    assert not (tmp_path / "missing").exists()


def test_two_concurrent_cli_writers_one_is_refused_at_once(tmp_path):
    """A `threeds select` into a run another process is writing stops at once with exit status 4
    (the holder never lets go: a writer that waited for the lock would not return)."""
    proc = hold_in_child(tmp_path / "run")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "threeds", "select", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "o.json")],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == LOCKED
        assert result.stderr.strip().splitlines() == [
            f"ERROR threeds: {tmp_path / 'run'}: the run directory is being written by pid {proc.pid}; wait for it "
            "to finish, stop it, or write to another directory"
        ]
    finally:
        proc.kill()
        proc.wait()


def test_a_writer_asked_to_wait_takes_the_lock_its_holder_drops_and_is_refused_by_one_that_keeps_it(tmp_path):
    proc = hold_in_child(tmp_path / "run")
    try:
        with pytest.raises(LockedError, match=f"pid {proc.pid}"):
            with locked(tmp_path / "run", wait=0.3):
                pass
        threading.Timer(0.3, proc.kill).start()  # the holder dies while the writer waits
        with locked(tmp_path / "run", wait=600):
            assert holder(tmp_path / "run") == os.getpid()
    finally:
        proc.kill()
        proc.wait()
