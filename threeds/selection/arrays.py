"""The array operations k-center greedy needs, on numpy (the CPU) or torch (a GPU, or bfloat16).

`threeds select` on a CPU runs on numpy, so it never imports torch (seconds of start-up for a
command that takes a fraction of one); torch is imported only where a GPU could be there or
bfloat16 storage is asked for. Both backends do the same float32 arithmetic in the same order;
their matrix products come from different BLAS kernels, so picks can differ only where
candidates lie within float32 round-off of each other.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
_NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def resolve_device(device=None) -> str:
    """The device as a string ("cpu", "cuda", "cuda:1"): CUDA when present unless told otherwise.
    torch is asked only where it is loaded already or an NVIDIA driver is."""
    if device is not None:
        return str(device)
    if "torch" not in sys.modules and not _NVIDIA_DRIVER.exists():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def storage_dtype(dtype=None) -> str:
    """The name of the rows' storage dtype (a name or a torch dtype; None: float32)."""
    name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    return name


def is_tensor(array) -> bool:
    """A torch tensor (torch is never imported to find out)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(array, torch.Tensor)


def ops_for(device: str, dtype: str) -> NumpyOps | TorchOps:
    """numpy for the CPU (float32 or float16 storage), torch otherwise."""
    if device == "cpu" and dtype != "bfloat16":
        return NumpyOps(dtype)
    return TorchOps(device, dtype)


def host_rows(emb, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as a float32 numpy array, without copying the whole input."""
    if is_tensor(emb):
        return emb[start:stop].float().cpu().numpy()
    return np.ascontiguousarray(emb[start:stop], dtype=np.float32)


@cache
def _blas_threads():
    """The loaded BLAS libraries' thread settings (looked up once: a look-up takes milliseconds)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class NumpyOps:
    """numpy on the host."""

    def __init__(self, dtype: str) -> None:
        self.dtype, self.device_kind = np.dtype(dtype), "cpu"
        self._weights: np.ndarray | None = None

    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def full(self, n: int, value: float) -> np.ndarray:
        return np.full(n, value, dtype=np.float32)

    def counters(self, n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.int64)

    def arange(self, start: int, stop: int) -> np.ndarray:
        return np.arange(start, stop)

    def indices(self, rows: list[int]) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64)

    def shared(self, emb) -> np.ndarray | None:
        """The input itself when it is float32 rows, or float16 rows for float32 storage (they convert
        exactly, block by block: a memory-mapped float16 matrix is never copied whole)."""
        usable = (np.float32, np.float16) if self.dtype == np.float32 else (np.float32,)
        if is_tensor(emb) or emb.dtype not in usable or not emb.flags.c_contiguous:
            return None
        return emb

    def rows(self, emb, start: int, stop: int) -> np.ndarray:
        return host_rows(emb, start, stop)

    def f32(self, array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """`array` as float32: itself if it is, else converted into `out[:len(array)]` when given
        (a buffer used again and again: a fresh block would pay its page faults every time)."""
        if array.dtype == np.float32 or out is None:
            return array.astype(np.float32, copy=False)
        np.copyto(out[: len(array)], array)
        return out[: len(array)]

    def host(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def argsort(self, values: np.ndarray) -> np.ndarray:
        return np.argsort(values, kind="stable")

    def rowargmin(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's min and its column."""
        at = array.argmin(1)
        return np.take_along_axis(array, at[:, None], 1)[:, 0], at

    def nonzero(self, mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask)

    def largest(self, values: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The m largest values, largest first, and their indices."""
        top = np.argpartition(values, len(values) - m)[len(values) - m :]
        top = top[np.argsort(-values[top], kind="stable")]
        return values[top], top

    def rowmin(self, array: np.ndarray) -> np.ndarray:
        return array.min(1)

    def clamp_and_hide(self, dist: np.ndarray, hidden: np.ndarray) -> None:
        """In place: negative round-off to 0, `hidden` entries to infinity."""
        np.maximum(dist, 0.0, out=dist)
        np.putmask(dist, hidden, np.inf)

    def all_finite(self, array: np.ndarray) -> bool:
        return bool(np.isfinite(array).all())

    minimum = staticmethod(np.minimum)
    concat = staticmethod(np.concatenate)

    def hash_rows(self, rows: np.ndarray) -> np.ndarray:
        """A 64-bit hash of each float32 row's bits: integer arithmetic (wraps around, exact and
        order-free, so equal rows hash equally wherever they sit); -0.0 and 0.0 hash alike."""
        dim = rows.shape[1]
        if self._weights is None or len(self._weights) != (dim // 2 if dim % 2 == 0 else dim):
            words = dim // 2 if dim % 2 == 0 else dim  # pairs of float32 as one uint64 where they pair up
            self._weights = np.random.default_rng(0).integers(1, 2**63, words, dtype=np.uint64) | np.uint64(1)
        rows = rows + np.float32(0)  # -0.0 and 0.0 are the same point
        bits = rows.view(np.uint64) if dim % 2 == 0 else rows.view(np.uint32).astype(np.uint64)
        return bits @ self._weights

    def first_copies(self, x: np.ndarray, hashes: np.ndarray, chunk_rows: int) -> np.ndarray:
        """For every row, the lowest index of a row with the same values (itself if none earlier):
        rows of equal `hashes` (`hash_rows`) are compared value by value."""
        n = len(x)
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        starts = np.ones(n, dtype=bool)
        starts[1:] = ordered[1:] != ordered[:-1]
        run_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        first = np.empty(n, dtype=np.int64)
        first[order] = order[run_start]
        copies = np.flatnonzero(first != np.arange(n))
        for s in range(0, len(copies), chunk_rows):  # a hash collision is not a copy
            c = copies[s : s + chunk_rows]
            same = (x[c].astype(np.float32) == x[first[c]].astype(np.float32)).all(1)
            first[c] = np.where(same, first[c], c)
        return first

    @contextmanager
    def greedy_settings(self):
        """BLAS on one thread: k-center's products are small (tens of rows), where OpenBLAS's second
        thread costs more than it saves and, on a busy machine, spins: 20x the CPU time measured."""
        with _blas_threads().limit(limits=1, user_api="blas"):
            yield


class TorchOps:
    """torch on `device` (imported here, not before)."""

    def __init__(self, device: str, dtype: str) -> None:
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.dtype, self.device_kind = getattr(torch, dtype), self.device.type
        self._weights = None

    def empty(self, shape, dtype=None):
        return self.torch.empty(shape, dtype=dtype or self.torch.float32, device=self.device)

    def full(self, n: int, value: float):
        return self.torch.full((n,), value, dtype=self.torch.float32, device=self.device)

    def counters(self, n: int):
        return self.torch.zeros(n, dtype=self.torch.int64, device=self.device)

    def arange(self, start: int, stop: int):
        return self.torch.arange(start, stop, device=self.device)

    def indices(self, rows: list[int]):
        return self.torch.tensor(rows, dtype=self.torch.int64, device=self.device)

    def shared(self, emb):
        """The input itself when it is float32 rows on this device that need no copy."""
        torch = self.torch
        if isinstance(emb, torch.Tensor):
            ok = emb.device == torch.empty(0, device=self.device).device and emb.dtype == torch.float32
            return emb if ok and emb.is_contiguous() else None
        if self.device.type == "cpu" and emb.dtype == np.float32 and emb.flags.c_contiguous and emb.flags.writeable:
            return torch.from_numpy(emb)
        return None

    def rows(self, emb, start: int, stop: int):
        if isinstance(emb, self.torch.Tensor):
            return emb[start:stop].to(self.device, self.torch.float32)
        rows = host_rows(emb, start, stop)
        if not rows.flags.writeable:  # e.g. a read-only memmap; torch wants writable memory
            rows = rows.copy()
        return self.torch.from_numpy(rows).to(self.device)

    def f32(self, array, out=None):
        return array.to(self.torch.float32)

    def host(self, array) -> np.ndarray:
        return array.cpu().numpy()

    def argsort(self, values):
        return self.torch.argsort(values, stable=True)

    def rowargmin(self, array):
        return array.min(1)

    def nonzero(self, mask):
        return self.torch.nonzero(mask)[:, 0]

    def largest(self, values, m: int):
        return self.torch.topk(values, m, sorted=True)

    def rowmin(self, array):
        return array.amin(1)

    def clamp_and_hide(self, dist, hidden) -> None:
        dist.clamp_min_(0.0).masked_fill_(hidden, float("inf"))

    def all_finite(self, array) -> bool:
        return bool(self.torch.isfinite(array).all())

    def minimum(self, a, b):
        return self.torch.minimum(a, b)

    def concat(self, arrays):
        return self.torch.cat(arrays)

    def hash_rows(self, rows):
        """`NumpyOps.hash_rows` on the device: the float32 bits times int64 weights small enough
        that no sum overflows."""
        dim = rows.shape[1]
        if self._weights is None or len(self._weights) != dim:
            span = 2 ** (62 - 32 - max(1, dim - 1).bit_length())
            gen = self.torch.Generator().manual_seed(0)
            self._weights = self.torch.randint(-span, span, (dim,), generator=gen, dtype=self.torch.int64).to(self.device)
        rows = rows + 0.0  # -0.0 and 0.0 are the same point
        return (rows.view(self.torch.int32).to(self.torch.int64) * self._weights).sum(1)

    def first_copies(self, x, hashes, chunk_rows: int):
        return _first_copies(self.torch, x, hashes, chunk_rows)

    @contextmanager
    def greedy_settings(self):
        """TF32 would round the dot products."""
        precision = self.torch.get_float32_matmul_precision()
        self.torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            self.torch.set_float32_matmul_precision(precision)


def _first_copies(torch, x, hashes, chunk_rows: int):
    """`NumpyOps.first_copies` on the device: a stable sort groups equal `hashes`, and comparing
    the rows rules out hash collisions."""
    n = len(x)
    ordered, order = torch.sort(hashes, stable=True)
    starts = torch.ones(n, dtype=torch.bool, device=x.device)
    starts[1:] = ordered[1:] != ordered[:-1]
    position = torch.arange(n, device=x.device)
    run_start = torch.cummax(torch.where(starts, position, 0), 0).values
    first = torch.empty_like(order)
    first[order] = order[run_start]
    copies = torch.nonzero(first != position)[:, 0]
    for s in range(0, len(copies), chunk_rows):
        c = copies[s : s + chunk_rows]
        same = (x.index_select(0, c) == x.index_select(0, first[c])).all(1)
        first[c] = torch.where(same, first[c], c)
    return first
