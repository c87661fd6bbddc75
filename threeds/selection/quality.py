"""Stage 1's rule: a pair is kept when the model rated it at or above the quality threshold."""

from __future__ import annotations

import numpy as np


def quality_mask(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Stage 1's rule: keep score >= threshold; an unrated (NaN) record is dropped."""
    scores = np.asarray(scores, dtype=float)
    with np.errstate(invalid="ignore"):
        return scores >= threshold
