"""The one error path: what a failure says (one line) and the exit status it ends in.

Every expected failure is a `ThreedsError` (or an `OSError`, `KeyboardInterrupt`): the command line
prints `threeds: error: <message>` and exits with the class's code; only `--debug` shows a
traceback. The message names the file and, where known, the line, row or field, like a compiler's
`file:line: message`. Exit codes: `EXIT_CODES` (the README's "Exit status" lists them).
"""

from __future__ import annotations

import errno
import os

OK = 0
BAD_INPUT = 1  # bad input file, bad or inconsistent run files, bad settings
USAGE = 2  # command-line usage (argparse)
RECORDS_FAILED = 3  # finished, but some records failed (or none was selected): run again to retry
LOCKED = 4  # another process is writing the run directory
IO_ERROR = 5  # the operating system refused: disk full, permission denied, not a directory, ...
SERVER_DOWN = 6  # the model server stopped answering; what was done is kept, run again to resume
INTERRUPTED = 130  # Ctrl-C / SIGINT (128 + 2); finished work is kept

EXIT_CODES = {
    OK: "success",
    BAD_INPUT: "bad input, bad or inconsistent run files, or bad settings",
    USAGE: "command-line usage error",
    RECORDS_FAILED: "done with failures (run the same command again to retry the failed records), an empty selection, "
    "or a proxy check that did not pass",
    LOCKED: "another process is writing the run directory",
    IO_ERROR: "the operating system refused a read or write (disk full, permission denied, ...)",
    SERVER_DOWN: "the model server is down; finished records are kept, run again to resume",
    INTERRUPTED: "interrupted; finished work is kept, run the same command again to continue",
}


class ThreedsError(Exception):
    """An expected failure: one line for the user and the exit status it ends in.

    `path` and `where` (e.g. "line 3", "row 5", "field instruction") are prefixed to the message
    when given, so callers that already put the file in their message need not pass them.
    """

    exit_code = BAD_INPUT

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, where: str | None = None,
                 exit_code: int | None = None) -> None:  # fmt: skip
        prefix = ": ".join(str(p) for p in (path, where) if p is not None)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path, self.where = path, where
        if exit_code is not None:
            self.exit_code = exit_code


class SettingsError(ThreedsError, ValueError):
    """A setting out of its range (a flag value the parser could not check)."""

    exit_code = USAGE


class LockedError(ThreedsError):
    """The run directory is being written by another process."""

    exit_code = LOCKED


class ServerDownError(ThreedsError):
    """The model server failed too many requests in a row to go on."""

    exit_code = SERVER_DOWN


_OS_HINTS = {
    errno.ENOSPC: "disk full; free some space and run the same command again",
    errno.EDQUOT: "disk quota exceeded; free some space and run the same command again",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a directory, expected a file",
    errno.ENOTDIR: "not a directory",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or directory",
    errno.EROFS: "read-only file system",
}


def describe(exc: BaseException) -> tuple[str, int]:
    """The one line and exit status of an expected failure (anything else is a bug: (str, 1))."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted: finished work is saved; run the same command again to continue", INTERRUPTED
    if isinstance(exc, ThreedsError):
        return one_line(str(exc)), exc.exit_code
    if isinstance(exc, OSError):
        return one_line(os_message(exc)), IO_ERROR
    return one_line(f"{type(exc).__name__}: {exc}"), BAD_INPUT


def os_message(exc: OSError) -> str:
    """`path: what went wrong` for an OSError, with a hint for the common ones."""
    reason = _OS_HINTS.get(exc.errno) or exc.strerror or str(exc)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a library exception's message (they run to many lines), for a one-line cause."""
    lines = str(exc).strip().splitlines()
    return (lines[0].strip() if lines else type(exc).__name__)[:limit]


def one_line(message: str) -> str:
    """Newlines folded so the message stays one line on the terminal and in logs."""
    return " ".join(message.split("\n")).strip()
