"""Stage 2 selection: percentile bands on the three difficulty metrics, then k-center greedy.

Spec items 7 and 8 (docs/SPEC-3DS.md): keep samples inside a percentile band of every metric,
then pick `sample_num` survivors by farthest-point (k-center) greedy over their embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from threeds.config import SelectConfig, check_settings
from threeds.names import METRIC_NAMES, METRICS, SHORT_NAMES, metric_column
from threeds.rundir.progress import TerminalBar
from threeds.selection.arrays import is_tensor, ops_for, resolve_device, storage_dtype

# Why a metric can be NaN (spec item 6); inf (overflow) is counted with NaN.
NAN_REASONS = {
    "ins_ppl": "no prompt token to score",
    "gen_wloss": "no generated-response token left after truncation and function-word filtering",
    "gt_wloss": "no ground-truth-response token left after truncation and function-word filtering",
}
_CHUNK_BYTES = 64 << 20  # float32 bytes per chunk when uploading / converting rows
_CENTRE_ROWS = 4096  # about this many evenly spaced rows estimate the centroid
_REFRESH_ROWS = 64  # rows brought up to date per try when looking for the farthest one
_BOUND_DIMS = 64  # principal directions of the cheap lower bounds on distances
_BASIS_ROWS = 1024  # about this many evenly spaced rows give those directions
_EXACT_ROWS = 64  # rows per exact product (sorted by nearest centre, so they need few of the same centres)
_BOUND_MIN_ROWS = 4096  # fewer rows: exact distances are cheap, the projection's set-up would cost more
_TOP_ROWS = 4096  # rows with the largest bounds kept at hand between picks (no pass over all bounds per pick)
_PASS_ROWS = 512  # rows per float32 block of the pass that computes norms, projection and hashes


class NonFiniteError(ValueError):
    """The embeddings hold NaN or infinity: no distance can be computed."""


# ---------------------------------------------------------------------------- band filter


def band_thresholds(values: np.ndarray, low: float, high: float, sorted_finite: np.ndarray | None = None) -> tuple[float, float]:
    """Values at the `low` and `high` percentiles of the finite entries (NaN, NaN if none); the band
    is one `threeds.config` checked (`SelectConfig.bands()`, `resolve_bands`). `sorted_finite`, when
    given, is those entries already sorted (`finite_sorted`): then each end is found in constant time."""
    if sorted_finite is not None:
        return percentile_of_sorted(sorted_finite, low), percentile_of_sorted(sorted_finite, high)
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [low, high])  # numpy's default: linear interpolation
    return float(lo), float(hi)


def finite_sorted(values: np.ndarray) -> np.ndarray:
    """The finite entries of `values`, ascending, as float64: what `percentile_of_sorted` reads."""
    v = np.asarray(values, dtype=np.float64)
    return np.sort(v[np.isfinite(v)])


def percentile_of_sorted(sorted_values: np.ndarray, q: float) -> float:
    """`np.percentile(values, q)` (linear interpolation) from the values already sorted, equal to
    numpy's to the last bit: the same virtual index ((n - 1) * q / 100), neighbours and two-sided
    interpolation (numpy 2's `_lerp`), without numpy's O(n) partition. NaN for no values."""
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    at = (n - 1) * np.true_divide(np.float64(q), 100)
    below = np.floor(at)
    if at >= n - 1:
        return float(sorted_values[n - 1])
    if at < 0:
        return float(sorted_values[0])
    a, b = sorted_values[int(below)], sorted_values[int(below) + 1]
    t, diff = at - below, b - a
    return float(b - diff * (1 - t) if t >= 0.5 else a + diff * t)


def within(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """True where lo <= value <= hi; NaN/inf never pass."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values >= lo) & (values <= hi)


def resolve_bands(bands: Mapping[str, Sequence[float]] | None) -> dict[str, tuple[float, float]]:
    """A (low, high) percentile band for every metric, the method's (25, 75) where none is given, checked by
    `threeds.config`'s rules (as `SelectConfig`'s band fields: a SettingsError names a bad one)."""
    bands = dict(bands or {})
    unknown = set(bands) - set(METRICS)
    if unknown:
        raise ValueError(f"bands for unknown metrics {sorted(unknown)}; expected keys from {METRICS}")
    fields = {}
    for m, band in bands.items():
        if len(band) != 2:
            raise ValueError(f"band for {m} must be (low, high), got {band!r}")
        fields[f"{SHORT_NAMES[m]}_low"], fields[f"{SHORT_NAMES[m]}_up"] = (float(end) for end in band)
    return check_settings(SelectConfig(**fields)).bands()


def _float_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def band_filter(
    metrics: pd.DataFrame,
    bands: Mapping[str, Sequence[float]] | None = None,
    atten_method: str = SelectConfig.atten_method,
    sorted_finite: Mapping[str, np.ndarray] | None = None,
    pool: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Intersection of the three percentile bands (spec item 7) and a report of what each removed.

    Missing entries of `bands` default to (25, 75). Each band's percentiles are computed over
    that metric's finite values. Report: `n_total`; `n_excluded_nan` (rows with a non-finite value
    in any metric); `n_finite`; per metric its column, band, thresholds `lo`/`hi`, `n_nan` with
    the reason, and `n_removed` (rows finite in all metrics that this band alone rejects; bands
    overlap, so these do not add up); `n_kept`. `pool` (bool per row) applies all of it to those
    rows only, as a frame of them would, without copying them (the mask is then False outside);
    `sorted_finite` (per metric, the finite values of those rows sorted, `finite_sorted`: the app
    keeps them per pool) spares the percentiles' O(n) work.
    """
    bands = resolve_bands(bands)
    columns = {m: metric_column(m, atten_method) for m in METRICS}
    missing = [c for c in columns.values() if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics table lacks columns {missing}")
    values = {m: metrics[c].to_numpy(dtype=np.float64) for m, c in columns.items()}
    rows = np.ones(len(metrics), dtype=bool) if pool is None else np.asarray(pool, dtype=bool)
    finite = {m: np.isfinite(v) for m, v in values.items()}
    finite_all = np.logical_and.reduce([rows, *finite.values()])
    keep = finite_all.copy()
    per_metric = {}
    for m in METRICS:
        if sorted_finite is not None:
            lo, hi = band_thresholds(values[m], *bands[m], sorted_finite[m])
        else:
            lo, hi = band_thresholds(values[m] if pool is None else values[m][rows], *bands[m])
        inside = within(values[m], lo, hi)
        keep &= inside
        per_metric[m] = {
            "name": METRIC_NAMES[m],
            "column": columns[m],
            "band": list(bands[m]),
            "lo": _float_or_none(lo),
            "hi": _float_or_none(hi),
            "n_nan": int((rows & ~finite[m]).sum()),
            "nan_reason": NAN_REASONS[m],
            "n_removed": int((finite_all & ~inside).sum()),
        }
    n_total = int(rows.sum())
    report = {
        "n_total": n_total,
        "atten_method": atten_method,
        "n_excluded_nan": n_total - int(finite_all.sum()),
        "n_finite": int(finite_all.sum()),
        "metrics": per_metric,
        "n_kept": int(keep.sum()),
    }
    return keep, report


# ---------------------------------------------------------------------------- k-center greedy


def _centre(emb) -> np.ndarray:
    """Approximate centroid from evenly spaced rows.

    Used before rounding rows to half precision: distances do not change under translation, but
    without the common offset the stored values keep more significant bits, stay inside float16's
    range, and ||x||^2 + ||c||^2 - 2 x.c cancels less. Float32 rows are not centred, so inputs
    that tie exactly (e.g. small integers) still tie exactly.
    """
    step = max(1, len(emb) // _CENTRE_ROWS)
    sample = emb[::step]
    if is_tensor(sample):
        return sample.double().mean(0).cpu().numpy()
    return np.asarray(sample, dtype=np.float64).mean(0)


def _upload(emb, ops, chunk_rows: int):
    """Rows in storage dtype on the backend's device (centred if half), their float32 squared norms,
    their hashes (`first_copies`), and their lower-bound projection (`_Projection`, None when not
    worth it).

    Float32 and float16 inputs on the CPU are used as they are (float16 converts to float32
    exactly, block by block), so a memory-mapped float16 matrix is never copied whole. Otherwise
    the rows are copied chunk by chunk, so that only one float32 chunk exists besides the stored
    matrix. Norms come from the stored (possibly rounded) values so that a point's distance to
    itself is ~0. Norms, projection and hashes come from one pass that converts each block of at
    most `_PASS_ROWS` rows once, into one buffer used again (8 MB at 4096 values a row).
    """
    n, d = emb.shape
    half = storage_dtype(ops.dtype) != "float32"
    x = None if half else ops.shared(emb)
    if x is None:
        centre = ops.rows(_centre(emb)[None], 0, 1) if half else None
        x = ops.empty((n, d), ops.dtype)
        with np.errstate(over="ignore"):  # a value past float16's range: reported below
            for s in range(0, n, chunk_rows):
                rows = ops.rows(emb, s, s + chunk_rows)
                x[s : s + chunk_rows] = rows if centre is None else rows - centre
    projection = _Projection.directions(x, ops) if n >= _BOUND_MIN_ROWS else None
    norms, hashes = ops.empty(n), None
    step = min(chunk_rows, _PASS_ROWS)
    buffer = ops.empty((step, d))
    for s in range(0, n, step):
        stored = ops.f32(x[s : s + step], buffer)
        norms[s : s + step] = (stored * stored).sum(1)
        if projection is not None:
            projection.project(stored, s)
        block = ops.hash_rows(stored)
        hashes = ops.empty(n, block.dtype) if hashes is None else hashes
        hashes[s : s + step] = block
    if not ops.all_finite(norms):
        hint = f" or overflow {storage_dtype(ops.dtype)} storage (try float32)" if half else ""
        raise NonFiniteError(f"embeddings contain NaN/inf{hint}")
    if projection is not None:
        projection.finish(norms)
    return x, norms, hashes, projection


class _Projection:
    """Lower bounds on squared distances from the rows projected on a few principal directions.

    For an orthonormal basis B, ||B'(x - c)|| <= ||x - c||, so a centre whose projected distance
    to a row exceeds the row's current min distance cannot lower it, and its exact distance (a
    product over all `dim` values) is skipped. The bound is loosened by `slack`, more than the
    float32 round-off of both the exact and the projected distance can be (about 2 * dim * 2^-24
    times the squared norms involved, times 4), so a skipped centre is one whose computed distance
    is not below the min either: the min distances, and so the picks, are those without it.
    """

    def __init__(self, ops, n: int, mean: np.ndarray, basis: np.ndarray) -> None:
        self.ops, self.dim = ops, basis.shape[0]
        self.mean, self.mean_sq = ops.rows(mean[None], 0, 1), float(mean @ mean)
        self.basis = ops.rows(basis, 0, len(basis))
        self.rows = ops.empty((n, basis.shape[1]))
        self.sq = self.slack = None

    @classmethod
    def directions(cls, x, ops) -> _Projection | None:
        """About the principal directions of evenly spaced rows (None for rows narrower than 8 values);
        any orthonormal basis gives valid bounds, one closer to them gives tighter ones."""
        n, dim = x.shape
        sample = ops.host(ops.f32(x[:: -(-n // _BASIS_ROWS)])).astype(np.float64)
        dims = min(_BOUND_DIMS, dim // 4, len(sample) - 1)
        if dims < 2:
            return None
        mean = sample.mean(0)
        sample -= mean
        basis = np.random.default_rng(0).standard_normal((dim, dims))
        for _ in range(3):  # subspace iteration: a few small products, no eigendecomposition
            basis, _ = np.linalg.qr(sample.T @ (sample @ basis))  # orthonormal whatever the rank
        return cls(ops, n, mean, basis)

    def project(self, stored, start: int) -> None:
        self.rows[start : start + len(stored)] = (stored - self.mean) @ self.basis

    def finish(self, norms) -> None:
        self.sq = (self.rows * self.rows).sum(1)
        self.slack = (norms + self.mean_sq) * (8 * self.dim * 2.0**-24)

    def lower(self, rows, centres):
        """[len(rows), len(centres)] lower bounds on the computed squared distances (minus slack)."""
        bound = self.rows[rows] @ self.rows[centres].T
        bound *= -2.0
        bound += self.sq[rows][:, None]
        bound += self.sq[centres]
        bound *= 1 - 1e-4  # the basis is orthonormal to float32 round-off only
        bound -= self.slack[rows][:, None]
        bound -= self.slack[centres]
        return bound


class _LazyFarthest:
    """Farthest-point state in which each row's min distance may lag behind the chosen centres.

    `bound[i]` is row i's min squared distance over the first `seen[i]` centres: an upper bound
    on its min over all of them. Bringing a row up to date costs one small matrix product
    against the centres it has not seen, and a new centre moves few rows' distances, so the
    farthest row is usually found among the few rows with the largest bounds. Of those centres,
    the ones the projection's lower bound rules out are skipped (`_Projection`); `near[i]` is the
    centre that gave `bound[i]`, so rows near each other are brought up to date together. Arrays
    are the backend's (`ops`: numpy or torch).
    """

    def __init__(self, ops, x, norms, projection: _Projection | None, k: int, chunk_rows: int) -> None:
        n, dim = x.shape
        self.ops, self.x, self.norms, self.projection, self.chunk_rows = ops, x, norms, projection, chunk_rows
        self.centres = ops.empty((max(k, 1), dim))
        self.centre_norms = ops.empty(max(k, 1))
        self.centre_rows = ops.counters(max(k, 1))
        self.count = 0
        self.bound = ops.full(n, float("inf"))
        self.seen = ops.counters(n)
        self.near = ops.counters(n)
        self.remaining = n
        self.top, self.top_floor = None, float("inf")  # see `_largest`

    def add(self, row: int) -> None:
        """Make `row` a centre; a chosen row is never picked again (bound -inf)."""
        if self.count == len(self.centres):  # continued past the k it was made for: double the room
            self.centres = self.ops.concat([self.centres, self.ops.empty(self.centres.shape)])
            self.centre_norms = self.ops.concat([self.centre_norms, self.ops.empty(self.centre_norms.shape)])
            self.centre_rows = self.ops.concat([self.centre_rows, self.ops.counters(len(self.centre_rows))])
        self.centres[self.count] = self.ops.f32(self.x[row])
        self.centre_norms[self.count] = self.norms[row]
        self.centre_rows[self.count] = row
        self.count += 1
        self.drop(self.ops.indices([row]))

    def drop(self, rows) -> None:
        """Never pick `rows` (bound -inf): chosen rows, and later copies of other rows."""
        self.remaining -= int((self.bound[rows] > float("-inf")).sum())
        self.bound[rows] = float("-inf")

    def refresh(self, rows) -> None:
        """Bring `rows` up to date: min over the centres each has not seen yet.

        Most rows missed only the newest centre, and a few missed many; the two groups are
        done apart so the first does not pay for the second. Within a group, a centre a row
        has already seen is masked out rather than recomputed, so a bound never depends on how
        the work was grouped.
        """
        t = self.count
        seen = self.seen[rows]
        for behind in (seen == t - 1, seen < t - 1):
            if bool(behind.any()):
                self._catch_up(rows[behind], int(seen[behind].min()))
        self.seen[rows] = t

    def _catch_up(self, rows, lo: int) -> None:
        """Fold centres [lo, count) into `rows`' bounds, in blocks of about chunk_rows x dim values.

        Per block: the centres each row has seen or can rule out by the lower bound are hidden;
        the rows with any centre left, sorted by nearest centre, get exact distances
        `_EXACT_ROWS` at a time.
        """
        t = self.count
        cols = self.ops.arange(lo, t)
        step = max(1, min(self.chunk_rows, self.chunk_rows * self.x.shape[1] // (t - lo)))
        for s in range(0, len(rows), step):
            r = rows[s : s + step]
            hidden = cols < self.seen[r][:, None]
            if self.projection is not None:
                hidden |= self.projection.lower(r, self.centre_rows[lo:t]) > self.bound[r][:, None]
            todo = self.ops.nonzero(~hidden.all(1))
            todo = todo[self.ops.argsort(self.near[r[todo]])]
            for e in range(0, len(todo), _EXACT_ROWS):
                block = todo[e : e + _EXACT_ROWS]
                self._exact(r[block], hidden[block], lo)

    def _exact(self, rows, hidden, lo: int) -> None:
        """Fold the centres [lo, count) not `hidden` into `rows`' bounds: one product over the centres
        any of the rows needs, d = ||x||^2 + ||c||^2 - 2 x.c in float32, clamped at 0."""
        cols = self.ops.nonzero(~hidden.all(0))
        centres = lo + cols
        dist = self.ops.f32(self.x[rows]) @ self.centres[centres].T
        dist *= -2.0
        dist += self.norms[rows][:, None]
        dist += self.centre_norms[centres]
        self.ops.clamp_and_hide(dist, hidden[:, cols])
        best, at = self.ops.rowargmin(dist)
        closer = best < self.bound[rows]
        self.bound[rows] = self.ops.minimum(self.bound[rows], best)
        self.near[rows[closer]] = centres[at[closer]]

    def refresh_all(self) -> None:
        n = len(self.bound)
        for s in range(0, n, self.chunk_rows):
            self.refresh(self.ops.arange(s, min(n, s + self.chunk_rows)))

    def farthest(self) -> int:
        """The unchosen row farthest from all centres (ties: lowest index), exactly.

        Refreshes the m rows with the largest bounds; when the best refreshed row beats the
        largest bound left outside (strictly, so ties are settled), no other row can exceed it.
        Otherwise m grows fourfold, up to refreshing every row.
        """
        m = _REFRESH_ROWS
        while m < self.remaining:
            values, rows = self._largest(m + 1)
            rows = rows[:m]
            self.refresh(rows)
            fresh = self.bound[rows]
            best = fresh.max()
            if bool(best > values[m]):
                return int(rows[fresh == best].min())
            m *= 4
        self.refresh_all()
        return int(self.bound.argmax())

    def _largest(self, m: int):
        """The m largest bounds, largest first, and their rows; ties between rows at the m-th value
        may go either way (`farthest` needs only that no row left out has a larger bound).

        Bounds only fall, so the `_TOP_ROWS` rows that had the largest ones hold the m largest
        as long as their m-th is not below the largest bound outside them at the time they were
        chosen; only then are all the bounds searched again.
        """
        if m > _TOP_ROWS or len(self.bound) <= _TOP_ROWS:
            return self.ops.largest(self.bound, m)
        if self.top is not None:
            values, at = self.ops.largest(self.bound[self.top], m)
            if bool(values[m - 1] >= self.top_floor):
                return values, self.top[at]
        values, rows = self.ops.largest(self.bound, _TOP_ROWS + 1)
        self.top, self.top_floor = rows[:_TOP_ROWS], values[_TOP_ROWS]
        return values[:m], rows[:m]


def _initial_rows(embeddings, initial: Sequence[int], k: int) -> list[int]:
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
    embeddings,
    k: int,
    seed: int = 0,
    device=None,
    chunk_rows: int | None = None,
    dtype=None,
    progress: bool = False,
    initial: Sequence[int] = (),
) -> np.ndarray:
    """Farthest-point greedy (spec item 8); returns row indices in pick order.

    `embeddings`: [n, dim] numpy array or torch tensor. First centre
    `np.random.default_rng(seed).integers(n)` (or the rows `initial`, in that order, as centres
    before the greedy starts: "always include" rules), then repeatedly the unchosen row with the
    largest squared Euclidean distance to its nearest chosen centre; exact ties go to the lowest
    index. If n <= k all n rows are returned, still in pick order (once every distinct row is a
    centre, the rest follow by index, all at distance 0), so the first m picks are the same for
    every k >= m.

    Distances are d = ||x||^2 + ||c||^2 - 2 x.c in float32, clamped at 0. Rather than updating
    every row's min distance after every pick (one pass over all n x dim values per pick, which
    is memory-bound), rows are brought up to date lazily (`_LazyFarthest`): the picks are the
    same, the work is a few small matrix products per pick, and a centre whose distance to a row
    a cheap lower bound already rules out is skipped (`_Projection`). On random float32 data the picks
    equal a plain float32 `((x - c) ** 2).sum()` reference (tested); the two can differ only
    where candidates lie within float32 round-off of each other. `device`: "cpu" (numpy, no
    torch), "cuda"..., None for CUDA when present (`threeds.selection.arrays`). `dtype`
    float16/bfloat16 stores centred rows (see `_centre`) in half precision, half the memory,
    with float32 arithmetic; that rounds the data, so picks can differ from the float32 ones
    where distances are that close. `chunk_rows` bounds the float32 working blocks.
    """
    initial = _initial_rows(embeddings, initial, k)
    k = min(k, len(embeddings))
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
        self, embeddings, seed: int = 0, device=None, chunk_rows: int | None = None, dtype=None,
        initial: Sequence[int] = (), capacity: int = 64,
    ) -> None:  # fmt: skip
        n = len(embeddings)
        self.n, self.seed, self.initial = n, seed, _initial_rows(embeddings, initial, max(len(initial), 1))
        self.ops = ops_for(resolve_device(device), storage_dtype(dtype))
        chunk_rows = chunk_rows or max(1, _CHUNK_BYTES // (4 * embeddings.shape[1]))
        with self.ops.greedy_settings():
            x, norms, hashes, projection = _upload(embeddings, self.ops, chunk_rows)
            self.first = self.ops.first_copies(x, hashes, chunk_rows)
        self.state = _LazyFarthest(self.ops, x, norms, projection, max(capacity, len(self.initial)), chunk_rows)
        # a later copy of a row ties with it at every step and loses on index: never a candidate
        self.state.drop(self.ops.nonzero(self.first != self.ops.arange(0, n)))
        self.picks: list[int] = []

    def extend(self, k: int, progress: bool = False) -> np.ndarray:
        """The first k picks (k >= len(initial)), continuing the greedy where it stopped."""
        bar = TerminalBar("k-center", "pick", enabled=progress)
        bar(len(self.picks), k)
        try:
            with self.ops.greedy_settings():
                if not self.picks and self.n:
                    self._start()
                while len(self.picks) < k and self.state.remaining:
                    self.picks.append(self.state.farthest())
                    self.state.add(self.picks[-1])
                    bar(len(self.picks), k)
        finally:
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
            self.state.drop(self.ops.indices([int(self.first[pick])]))  # the first copy of a centre is at distance 0
        self.state.refresh_all()

