"""An array the app or a command derived from a run, kept beside it as .npy with a JSON description
(what it was computed from and with which settings): reused only while the description matches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from threeds.io.atomic import atomic_write

_DIGEST_BYTES = 64 << 20  # rows hashed at a time


def array_digest(array: np.ndarray) -> str:
    """sha256 of a 2-D array's shape and float32 rows: names what a cached result was made from."""
    digest = hashlib.sha256(str(array.shape).encode())
    rows = max(1, _DIGEST_BYTES // max(1, array.shape[1] * 4))
    for start in range(0, len(array), rows):
        digest.update(np.ascontiguousarray(array[start : start + rows], dtype=np.float32).tobytes())
    return digest.hexdigest()


def read_cached(array_path: Path, meta_path: Path, meta: dict, shape: tuple[int | None, ...]) -> np.ndarray | None:
    """The cached array if its description equals `meta` and it has `shape` (None: any length on
    that axis) and finite values; None when missing, stale, torn or corrupt (recompute)."""
    try:
        if json.loads(meta_path.read_text(encoding="utf-8")) != meta:
            return None
        array = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    fits = array.ndim == len(shape) and all(want in (None, got) for want, got in zip(shape, array.shape))
    return array if fits and np.isfinite(array).all() else None


def write_cached(array_path: Path, meta_path: Path, array: np.ndarray, meta: dict) -> None:
    """Array first, then its description: a torn write leaves a mismatch, never a wrong array. An
    unwritable directory only costs the recomputation next time."""
    try:
        atomic_write(array_path, lambda f: np.save(f, array, allow_pickle=False))
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1) + "\n"), "w")
    except OSError:
        pass
