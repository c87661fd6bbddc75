"""k-center pick orders that grow on demand and outlive the process.

k-center greedy is prefix-consistent: the first k picks of a run for k' > k are the picks for k
(same first centre, same farthest-point steps). A `sample_num` slider therefore slices the picks
made so far, and a request past them continues the same greedy (`select.KCenter`): moving the
slider never recomputes a pick.

The picks made so far are also kept in the run directory (`pick_orders/`, one .npy per set of
candidates, described by a JSON naming the candidates' embeddings, the seed, the initial centres,
device kind and storage dtype). `threeds select` leaves its order there, so the app's first map
of a finished run slices it instead of redoing minutes of greedy on 100k samples; a later
request past the stored picks starts from them as centres, which continues the same greedy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from threeds.io.array_cache import array_digest, read_cached, write_cached
from threeds.rundir import layout
from threeds.selection.arrays import resolve_device, storage_dtype
from threeds.selection.kcenter import KCenter

KEEP_ORDERS = 16  # orders kept per run (the newest): one per band setting tried


class PickOrder:
    """The k-center order over fixed candidates, computed only as far as asked, optionally kept
    in `run_dir` (above). Arguments as for `k_center_greedy`; `embeddings` are the candidates' rows."""

    def __init__(
        self, embeddings: np.ndarray, seed: int = 0, initial: Sequence[int] = (), run_dir: str | os.PathLike | None = None,
        device=None, dtype=None,
    ) -> None:  # fmt: skip
        self.embeddings, self.seed, self.initial = embeddings, seed, tuple(int(i) for i in initial)
        self.device, self.dtype = resolve_device(device), storage_dtype(dtype)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._where: tuple[Path, Path, dict] | None = None
        self._greedy: KCenter | None = None

    def picks(self, k: int, progress: bool = False) -> np.ndarray:
        """Candidate indices picked for `sample_num = k`, in pick order (all n if k >= n); k is at
        least len(initial)."""
        k = min(k, len(self.embeddings))
        if k == 0:
            return np.empty(0, dtype=np.int64)
        if self._greedy is None:
            stored = self._read()
            if len(stored) >= k:
                return stored[:k]
            self._greedy = KCenter(self.embeddings, self.seed, self.device, dtype=self.dtype,
                                   initial=stored.tolist() or self.initial, capacity=k)  # fmt: skip
        made = len(self._greedy.picks)
        picks = self._greedy.extend(k, progress)
        if len(self._greedy.picks) > made:
            self._write(np.asarray(self._greedy.picks, dtype=np.int64))
        return picks

    def _files(self) -> tuple[Path, Path, dict]:
        """(.npy, .json, description) of this order in the run directory; hashed once."""
        if self._where is not None:
            return self._where
        meta = {
            "embeddings_sha256": array_digest(self.embeddings), "rows": len(self.embeddings), "seed": self.seed,
            "initial": list(self.initial), "device": self.device.split(":")[0], "dtype": self.dtype,
        }  # fmt: skip
        name = meta["embeddings_sha256"][:24] + f"-{self.seed}-{len(self.initial)}"
        folder = self.run_dir / layout.PICK_ORDERS
        self._where = folder / f"{name}.npy", folder / f"{name}.json", meta
        return self._where

    def _read(self) -> np.ndarray:
        """The stored picks (a prefix of this greedy), or none: missing, stale or not a valid order."""
        if self.run_dir is None:
            return np.empty(0, dtype=np.int64)
        array, meta_path, meta = self._files()
        stored = read_cached(array, meta_path, meta, (None,))
        n, start = len(self.embeddings), list(self.initial)
        valid = (
            stored is not None and stored.dtype.kind == "i" and len(np.unique(stored)) == len(stored)
            and (len(stored) == 0 or 0 <= stored.min() <= stored.max() < n) and stored[: len(start)].tolist() == start
        )  # fmt: skip
        return stored.astype(np.int64) if valid else np.empty(0, dtype=np.int64)

    def _write(self, picks: np.ndarray) -> None:
        if self.run_dir is None:
            return
        array, meta_path, meta = self._files()
        try:  # an unwritable run directory only costs the greedy next time
            array.parent.mkdir(exist_ok=True)
            write_cached(array, meta_path, picks, meta)
            _prune(array.parent, KEEP_ORDERS)
        except OSError:
            pass


def _prune(folder: Path, keep: int) -> None:
    """Drop all but the `keep` newest orders (an order is its .npy and its .json)."""
    orders = sorted(folder.glob("*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in orders[keep:]:
        for path in (old, old.with_suffix(".json")):
            path.unlink(missing_ok=True)
