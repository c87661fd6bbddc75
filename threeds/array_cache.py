"""An array the app or a command derived from a run, kept beside it as .npy with a JSON description
(what it was computed from and with which settings): reused only while the description matches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from threeds.atomic import atomic_write


def read_cached(array_path: Path, meta_path: Path, meta: dict, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array if its description equals `meta` and it has `shape` and finite values;
    None when missing, stale, torn or corrupt (recompute)."""
    try:
        if json.loads(meta_path.read_text(encoding="utf-8")) != meta:
            return None
        array = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return array if array.shape == shape and np.isfinite(array).all() else None


def write_cached(array_path: Path, meta_path: Path, array: np.ndarray, meta: dict) -> None:
    """Array first, then its description: a torn write leaves a mismatch, never a wrong array."""
    atomic_write(array_path, lambda f: np.save(f, array, allow_pickle=False))
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1) + "\n"), "w")
