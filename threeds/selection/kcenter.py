"""Stage 2 selection: percentile bands on the three difficulty metrics, then k-center greedy.

Spec items 7 and 8 (docs/SPEC-3DS.md): keep samples inside a percentile band of every metric,
then pick `sample_num` survivors by farthest-point (k-center) greedy over their embeddings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from threeds.errors import SettingsError
from threeds.names import METRIC_NAMES, METRICS, metric_column

DEFAULT_BAND = (25.0, 75.0)
# Why a metric can be NaN (spec item 6); inf (overflow) is counted with NaN.
NAN_REASONS = {
    "ins_ppl": "no prompt token to score",
    "gen_wloss": "no generated-response token left after truncation and function-word filtering",
    "gt_wloss": "no ground-truth-response token left after truncation and function-word filtering",
}
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CHUNK_BYTES = 64 << 20  # float32 bytes per chunk when uploading / converting rows
_CENTRE_ROWS = 4096  # about this many evenly spaced rows estimate the centroid
_REFRESH_ROWS = 64  # rows brought up to date per try when looking for the farthest one


class NonFiniteError(ValueError):
    """The embeddings hold NaN or infinity: no distance can be computed."""


# ---------------------------------------------------------------------------- band filter


def _check_band(low: float, high: float) -> tuple[float, float]:
    low, high = float(low), float(high)
    if not (0.0 <= low <= high <= 100.0):
        raise SettingsError(f"percentile band needs 0 <= low <= high <= 100, got low={low}, high={high}")
    return low, high


def band_thresholds(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """Values at the `low` and `high` percentiles of the finite entries (NaN, NaN if none)."""
    low, high = _check_band(low, high)
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [low, high])  # numpy's default: linear interpolation
    return float(lo), float(hi)


def within(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """True where lo <= value <= hi; NaN/inf never pass."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values >= lo) & (values <= hi)


def _resolve_bands(bands: Mapping[str, Sequence[float]] | None) -> dict[str, tuple[float, float]]:
    bands = dict(bands or {})
    unknown = set(bands) - set(METRICS)
    if unknown:
        raise ValueError(f"bands for unknown metrics {sorted(unknown)}; expected keys from {METRICS}")
    out = {}
    for m in METRICS:
        band = bands.get(m, DEFAULT_BAND)
        if len(band) != 2:
            raise ValueError(f"band for {m} must be (low, high), got {band!r}")
        out[m] = _check_band(*band)
    return out


def _float_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def band_filter(
    metrics: pd.DataFrame,
    bands: Mapping[str, Sequence[float]] | None = None,
    atten_method: str = "mean",
) -> tuple[np.ndarray, dict]:
    """Intersection of the three percentile bands (spec item 7) and a report of what each removed.

    Missing entries of `bands` default to (25, 75). Each band's percentiles are computed over
    that metric's finite values. Report: `n_total`; `n_excluded_nan` (rows with a non-finite value
    in any metric); `n_finite`; per metric its column, band, thresholds `lo`/`hi`, `n_nan` with
    the reason, and `n_removed` (rows finite in all metrics that this band alone rejects; bands
    overlap, so these do not add up); `n_kept`.
    """
    bands = _resolve_bands(bands)
    columns = {m: metric_column(m, atten_method) for m in METRICS}
    missing = [c for c in columns.values() if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics table lacks columns {missing}")
    values = {m: metrics[c].to_numpy(dtype=np.float64) for m, c in columns.items()}
    finite_all = np.logical_and.reduce([np.isfinite(v) for v in values.values()])
    keep = finite_all.copy()
    per_metric = {}
    for m in METRICS:
        lo, hi = band_thresholds(values[m], *bands[m])
        inside = within(values[m], lo, hi)
        keep &= inside
        per_metric[m] = {
            "name": METRIC_NAMES[m],
            "column": columns[m],
            "band": list(bands[m]),
            "lo": _float_or_none(lo),
            "hi": _float_or_none(hi),
            "n_nan": int((~np.isfinite(values[m])).sum()),
            "nan_reason": NAN_REASONS[m],
            "n_removed": int((finite_all & ~inside).sum()),
        }
    report = {
        "n_total": int(len(metrics)),
        "atten_method": atten_method,
        "n_excluded_nan": int((~finite_all).sum()),
        "n_finite": int(finite_all.sum()),
        "metrics": per_metric,
        "n_kept": int(keep.sum()),
    }
    return keep, report


# ---------------------------------------------------------------------------- k-center greedy


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present unless told otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _storage_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
        return STORAGE_DTYPES[dtype]
    if dtype not in STORAGE_DTYPES.values():
        raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES.values())}, got {dtype}")
    return dtype


def _rows_float32(emb: np.ndarray | torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) as a float32 tensor, without copying the whole input."""
    if isinstance(emb, torch.Tensor):
        return emb[start:stop].to(torch.float32)
    rows = np.ascontiguousarray(emb[start:stop], dtype=np.float32)
    if not rows.flags.writeable:  # e.g. a read-only memmap; torch wants writable memory
        rows = rows.copy()
    return torch.from_numpy(rows)


def _centre(emb: np.ndarray | torch.Tensor) -> np.ndarray:
    """Approximate centroid from evenly spaced rows.

    Used before rounding rows to half precision: distances do not change under translation, but
    without the common offset the stored values keep more significant bits, stay inside float16's
    range, and ||x||^2 + ||c||^2 - 2 x.c cancels less. Float32 rows are not centred, so inputs
    that tie exactly (e.g. small integers) still tie exactly.
    """
    step = max(1, len(emb) // _CENTRE_ROWS)
    sample = emb[::step]
    if isinstance(sample, torch.Tensor):
        return sample.to(torch.float64).mean(0).cpu().numpy()
    return np.asarray(sample, dtype=np.float64).mean(0)


def _shared_float32(emb: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The input itself as a float32 tensor on `device` when that needs no copy (saves n*dim*4 B)."""
    if isinstance(emb, torch.Tensor):
        same_device = emb.device == torch.empty(0, device=device).device
        ok = same_device and emb.dtype == torch.float32 and emb.is_contiguous()
        return emb if ok else None
    flags = emb.flags
    if device.type == "cpu" and emb.dtype == np.float32 and flags.c_contiguous and flags.writeable:
        return torch.from_numpy(emb)
    return None


def _upload(
    emb: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype, chunk_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in storage dtype on `device` (centred if half), and their float32 squared norms.

    Chunked so that only one float32 chunk exists besides the stored matrix. Norms come from the
    stored (possibly rounded) values so that a point's distance to itself is ~0.
    """
    n, d = emb.shape
    x = _shared_float32(emb, device) if dtype == torch.float32 else None
    if x is None:
        centre = None
        if dtype != torch.float32:
            centre = torch.from_numpy(_centre(emb)).to(device, torch.float32)
        x = torch.empty((n, d), dtype=dtype, device=device)
        for s in range(0, n, chunk_rows):
            rows = _rows_float32(emb, s, s + chunk_rows).to(device)
            x[s : s + chunk_rows] = rows if centre is None else rows - centre
    norms = torch.empty(n, dtype=torch.float32, device=device)
    for s in range(0, n, chunk_rows):
        stored = x[s : s + chunk_rows].to(torch.float32)
        norms[s : s + chunk_rows] = (stored * stored).sum(1)
    if not bool(torch.isfinite(norms).all()):
        hint = "" if dtype == torch.float32 else f" or overflow {dtype} storage (try float32)"
        raise NonFiniteError(f"embeddings contain NaN/inf{hint}")
    return x, norms


def _first_copies(x: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """For every row, the lowest index of a row with the same values (itself if none earlier).

    Rows are hashed by their bits with integer arithmetic (exact and order-free, so equal rows
    hash equally wherever they sit), hash collisions are ruled out by comparing the rows, and a
    stable sort groups them.
    """
    n, dim = x.shape
    bits_dtype = torch.int32 if x.element_size() == 4 else torch.int16
    span = 2 ** (62 - 8 * x.element_size() - max(1, dim - 1).bit_length())  # no int64 overflow
    gen = torch.Generator().manual_seed(0)
    weights = torch.randint(-span, span, (dim,), generator=gen, dtype=torch.int64).to(x.device)
    hashes = torch.empty(n, dtype=torch.int64, device=x.device)
    step = max(1, chunk_rows // 4)  # two int64 temporaries per value: about the float32 chunk's bytes
    for s in range(0, n, step):
        rows = x[s : s + step] + 0.0  # -0.0 and 0.0 are the same point
        hashes[s : s + step] = (rows.view(bits_dtype).to(torch.int64) * weights).sum(1)
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


class _LazyFarthest:
    """Farthest-point state in which each row's min distance may lag behind the chosen centres.

    `bound[i]` is row i's min squared distance over the first `seen[i]` centres: an upper bound
    on its min over all of them. Bringing a row up to date costs one small matrix product
    against the centres it has not seen, and a new centre moves few rows' distances, so the
    farthest row is usually found among the few rows with the largest bounds.
    """

    def __init__(self, x: torch.Tensor, norms: torch.Tensor, k: int, chunk_rows: int) -> None:
        n, dim = x.shape
        self.x, self.norms, self.chunk_rows = x, norms, chunk_rows
        self.centres = torch.empty((max(k, 1), dim), dtype=torch.float32, device=x.device)
        self.centre_norms = torch.empty(max(k, 1), dtype=torch.float32, device=x.device)
        self.count = 0
        self.bound = torch.full((n,), float("inf"), dtype=torch.float32, device=x.device)
        self.seen = torch.zeros(n, dtype=torch.int64, device=x.device)
        self.remaining = n

    def add(self, row: int) -> None:
        """Make `row` a centre; a chosen row is never picked again (bound -inf)."""
        if self.count == len(self.centres):  # continued past the k it was made for: double the room
            self.centres = torch.cat([self.centres, torch.empty_like(self.centres)])
            self.centre_norms = torch.cat([self.centre_norms, torch.empty_like(self.centre_norms)])
        self.centres[self.count] = self.x[row].to(torch.float32)
        self.centre_norms[self.count] = self.norms[row]
        self.count += 1
        self.drop(torch.tensor([row], device=self.bound.device))

    def drop(self, rows: torch.Tensor) -> None:
        """Never pick `rows` (bound -inf): chosen rows, and later copies of other rows."""
        self.remaining -= int((self.bound.index_select(0, rows) > float("-inf")).sum())
        self.bound[rows] = float("-inf")

    def refresh(self, rows: torch.Tensor) -> None:
        """Bring `rows` up to date: min over the centres each has not seen yet.

        Most rows missed only the newest centre, and a few missed many; the two groups are
        done apart so the first does not pay for the second. Within a group, a centre a row
        has already seen is masked out rather than recomputed, so a bound never depends on how
        the work was grouped.
        """
        t = self.count
        seen = self.seen.index_select(0, rows)
        for behind in (seen == t - 1, seen < t - 1):
            if bool(behind.any()):
                self._catch_up(rows[behind], int(seen[behind].min()))
        self.seen[rows] = t

    def _catch_up(self, rows: torch.Tensor, lo: int) -> None:
        """Fold centres [lo, count) into `rows`' bounds, in blocks of about chunk_rows x dim floats."""
        t = self.count
        cols = torch.arange(lo, t, device=rows.device)
        step = max(1, min(self.chunk_rows, self.chunk_rows * self.x.shape[1] // (t - lo)))
        for s in range(0, len(rows), step):
            r = rows[s : s + step]
            xr = self.x.index_select(0, r).to(torch.float32)
            dist = torch.mm(xr, self.centres[lo:t].T).mul_(-2.0)
            dist.add_(self.norms.index_select(0, r)[:, None]).add_(self.centre_norms[lo:t])
            dist.clamp_min_(0.0).masked_fill_(cols < self.seen.index_select(0, r)[:, None], float("inf"))
            self.bound[r] = torch.minimum(self.bound.index_select(0, r), dist.amin(1))

    def refresh_all(self) -> None:
        n = len(self.bound)
        for s in range(0, n, self.chunk_rows):
            self.refresh(torch.arange(s, min(n, s + self.chunk_rows), device=self.bound.device))

    def farthest(self) -> int:
        """The unchosen row farthest from all centres (ties: lowest index), exactly.

        Refreshes the m rows with the largest bounds; when the best refreshed row beats the
        largest bound left outside (strictly, so ties are settled), no other row can exceed it.
        Otherwise m grows fourfold, up to refreshing every row.
        """
        m = _REFRESH_ROWS
        while m < self.remaining:
            values, rows = torch.topk(self.bound, m + 1, sorted=True)
            rows = rows[:m]
            self.refresh(rows)
            fresh = self.bound.index_select(0, rows)
            best = fresh.max()
            if bool(best > values[m]):
                return int(rows[fresh == best].min())
            m *= 4
        self.refresh_all()
        return int(torch.argmax(self.bound))


def _initial_rows(embeddings: np.ndarray | torch.Tensor, initial: Sequence[int], k: int) -> list[int]:
    """Checks k-center's arguments; the `initial` centres as a list."""
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [n, dim], got shape {tuple(embeddings.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n, rows = len(embeddings), [int(i) for i in initial]
    if len(set(rows)) != len(rows) or any(not 0 <= i < n for i in rows) or len(rows) > max(k, 0):
        raise ValueError(f"initial centres must be at most k={k} distinct rows in [0, {n}), got {rows[:10]}")
    return rows


def k_center_greedy(
    embeddings: np.ndarray | torch.Tensor,
    k: int,
    seed: int = 0,
    device: str | torch.device | None = None,
    chunk_rows: int | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
    initial: Sequence[int] = (),
) -> np.ndarray:
    """Farthest-point greedy (spec item 8); returns row indices in pick order.

    First centre `np.random.default_rng(seed).integers(n)` (or the rows `initial`, in that order,
    as centres before the greedy starts: "always include" rules), then repeatedly the unchosen row
    with the largest squared Euclidean distance to its nearest chosen centre; exact ties go to
    the lowest index. If n <= k all rows are returned as 0..n-1.

    Distances are d = ||x||^2 + ||c||^2 - 2 x.c in float32, clamped at 0. Rather than updating
    every row's min distance after every pick (one pass over all n x dim values per pick, which
    is memory-bound), rows are brought up to date lazily (`_LazyFarthest`): the picks are the
    same, the work is a few small matrix products per pick. On random float32 data the picks
    equal a plain float32 `((x - c) ** 2).sum()` reference (tested); the two can differ only
    where candidates lie within float32 round-off of each other. `dtype` float16/bfloat16
    stores centred rows (see `_centre`) in half precision, half the memory, with float32
    arithmetic; that rounds the data, so picks can differ from the float32 ones where distances
    are that close. `chunk_rows` bounds the float32 working blocks.
    """
    n = len(embeddings)
    initial = _initial_rows(embeddings, initial, k)
    if n <= k:
        return np.asarray(initial + sorted(set(range(n)) - set(initial)), dtype=np.int64)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    greedy = KCenter(embeddings, seed, device, chunk_rows, dtype, initial, capacity=k)
    return greedy.extend(k, progress)


class KCenter:
    """k-center greedy that can be continued: `extend(k)` gives the first k picks, computing only
    those not computed yet. The greedy is prefix-consistent (the first k picks of a longer run are
    the picks for k), so a `sample_num` slider that moves up only adds picks, and one that moves
    down slices. Arguments as for `k_center_greedy`; `capacity` sizes the centre buffer (it grows)."""

    def __init__(
        self, embeddings: np.ndarray | torch.Tensor, seed: int = 0, device: str | torch.device | None = None,
        chunk_rows: int | None = None, dtype: torch.dtype | str | None = None, initial: Sequence[int] = (),
        capacity: int = 64,
    ) -> None:  # fmt: skip
        n = len(embeddings)
        self.n, self.seed, self.initial = n, seed, _initial_rows(embeddings, initial, max(len(initial), 1))
        device = resolve_device(device)
        chunk_rows = chunk_rows or max(1, _CHUNK_BYTES // (4 * embeddings.shape[1]))
        x, norms = _upload(embeddings, device, _storage_dtype(dtype), chunk_rows)
        self.state = _LazyFarthest(x, norms, max(capacity, len(self.initial)), chunk_rows)
        self.first = _first_copies(x, chunk_rows)
        # a later copy of a row ties with it at every step and loses on index: never a candidate
        self.state.drop(torch.nonzero(self.first != torch.arange(n, device=device))[:, 0])
        self.picks: list[int] = []

    def extend(self, k: int, progress: bool = False) -> np.ndarray:
        """The first k picks (k >= len(initial)), continuing the greedy where it stopped."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="k-center", unit="pick", initial=len(self.picks), total=k)
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # TF32 would round the dot products
        try:
            if not self.picks and self.n:
                self._start()
            while len(self.picks) < k and self.state.remaining:
                self.picks.append(self.state.farthest())
                self.state.add(self.picks[-1])
                if bar is not None:
                    bar.update()
        finally:
            torch.set_float32_matmul_precision(precision)
            if bar is not None:
                bar.close()
        picks = self.picks[:k]
        if len(picks) < k:  # every distinct point is a centre; the rest are at distance 0
            rest = np.setdiff1d(np.arange(self.n), picks)  # ascending: ties go to the lowest index
            picks = picks + rest[: k - len(picks)].tolist()
        return np.asarray(picks, dtype=np.int64)

    def _start(self) -> None:
        """The first centres: the `initial` rows, or one drawn with the seed."""
        self.picks = list(self.initial) or [int(np.random.default_rng(self.seed).integers(self.n))]
        for pick in self.picks:
            self.state.add(pick)
            self.state.drop(self.first[pick].view(1))  # the first copy of a centre is at distance 0
        self.state.refresh_all()


# ---------------------------------------------------------------------------- run directory


def selected_records(run_dir: str | os.PathLike, selected_ids: Sequence[str]) -> list[dict]:
    """Records of `data.jsonl` with the given ids, in the given (pick) order, all fields kept."""
    wanted = {str(i) for i in selected_ids}
    found: dict[str, dict] = {}
    with open(Path(run_dir) / "data.jsonl", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            rid = str(rec.get("id"))
            if rid in wanted:
                if rid in found:
                    raise ValueError(f"data.jsonl line {line_no}: duplicate id {rid!r}")
                found[rid] = rec
    missing = [i for i in selected_ids if str(i) not in found]
    if missing:
        raise KeyError(f"{len(missing)} selected ids not in data.jsonl, e.g. {missing[:5]}")
    return [found[str(i)] for i in selected_ids]
