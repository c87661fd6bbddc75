"""One writer per run directory: an exclusive `flock` on `<dir>/.lock`, holding the writer's pid.

A second writer (CLI or app) is refused at once with the holder's pid instead of racing it for the
same chunks and logs. The kernel drops a `flock` when its holder dies, however it dies, so a lock
left behind by a killed process never blocks: the file may stay, the lock does not.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from threeds.errors import LockedError, ThreedsError

LOCK_FILE = ".lock"

_held: dict[Path, list[int]] = {}  # directory -> [fd, depth], for re-entry from this process
_guard = threading.Lock()


@contextmanager
def locked(directory: str | os.PathLike, create: bool = True, wait: float = 0.0) -> Iterator[Path]:
    """Hold the directory's write lock for the block; re-entrant in a process.

    The directory is made if missing, unless `create` is False (a run to update must exist).
    Raises `LockedError` (exit status 4) naming the holder's pid when another process holds it
    (after retrying for `wait` seconds: a holder that is exiting releases it soon).
    """
    directory = Path(directory)
    if not create and not directory.is_dir():
        raise ThreedsError(f"{directory}: no such run directory")
    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire_within(directory, wait), 1]
    try:
        yield directory
    finally:
        with _guard:
            _held[key][1] -= 1
            if not _held[key][1]:
                _release(_held.pop(key)[0])


def holder(directory: str | os.PathLike) -> int | None:
    """Pid of the process holding the directory's lock, or None when nobody holds it."""
    path = Path(directory) / LOCK_FILE
    if Path(directory).resolve() in _held:
        return os.getpid()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid_in(fd) or -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _acquire_within(directory: Path, wait: float) -> int:
    deadline = time.monotonic() + wait
    while True:
        try:
            return _acquire(directory)
        except LockedError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


def _acquire(directory: Path) -> int:
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _pid_in(fd)
        os.close(fd)
        who = f"pid {pid}" if pid else "another process"
        raise LockedError(f"{directory}: the run directory is being written by {who}; wait for it to finish, "
                          "stop it, or write to another directory") from None  # fmt: skip
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # a stale pid must not be shown as the holder later
    finally:
        os.close(fd)  # closing the only descriptor drops the flock


def _pid_in(fd: int) -> int | None:
    """The pid the holder wrote (it may not have written it yet: None)."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
