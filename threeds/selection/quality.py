"""Stage 1's rule: a pair is kept when the model rated it at or above the quality threshold."""

from __future__ import annotations

import numpy as np


def quality_mask(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Stage 1's rule: keep score >= threshold; an unrated (NaN) record is dropped."""
    scores = np.asarray(scores, dtype=float)
    with np.errstate(invalid="ignore"):
        return scores >= threshold


def kept_per_bin(scores: np.ndarray, threshold: float, edges: np.ndarray) -> np.ndarray:
    """Per histogram bin (`edges`), how many of its scores the threshold keeps: a bin straddling the
    threshold is part kept, part dropped, whatever its centre (none when there is no bin)."""
    if len(edges) < 2:
        return np.zeros(0, dtype=np.int64)
    scores = np.asarray(scores, dtype=float)
    return np.histogram(scores[quality_mask(scores, threshold)], bins=edges)[0]
