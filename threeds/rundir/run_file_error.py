"""The error for a run file that is missing, unreadable or inconsistent with the others, and the
usual fix: named once for the modules that check run files (`check`, `record_index`)."""

from __future__ import annotations

from threeds.errors import ThreedsError

RESCORE = "score again (threeds score --overwrite, or delete the run directory)"


class RunFileError(ThreedsError, ValueError):
    """One file of a run directory is missing, unreadable or inconsistent with the others."""
