"""Waiting in tests on a condition, never for a fixed time: the suite must pass on a saturated machine.

`wait_for` polls until the condition holds (at once when it already does) and fails, naming what it
waited for, only after `WAIT` seconds, far beyond what any condition takes on a loaded machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WAIT = 300.0


def wait_for(condition: Callable[[], object], what: str, seconds: float = WAIT, poll: float = 0.02) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {seconds:.0f} s"
        time.sleep(poll)
