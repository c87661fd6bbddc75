"""One selection, applied the same way everywhere: a `SelectConfig` on a loaded run.

The app's pages, named presets (`<run>/selections/NAME.json`) and `threeds select` all come
here, so a selection tuned in the app, saved as a preset or printed as a command picks the same
ids in the same order. Order of the stages (docs/SPEC-3DS.md items 1, 7, 8):

1. quality: keep scored samples rated >= `quality_threshold` (none: every scored sample);
   flags: drop those whose A' carries one of `exclude_flags` (`threeds.selection.answer_flags`; none: keep all);
2. bands: percentile bands of the three metrics, percentiles taken over the samples kept by 1;
3. rules: `exclude` ids are never candidates; `include` ids always are, whatever 1 and 2 said;
4. k-center greedy over the candidates, starting from the `include` ids as centres, picks
   `max(sample_num, len(include))`.

Besides the picks, every scored sample gets a verdict (picked / not picked / dropped), the
reasons in words and its pick rank: what the app's table shows and filters on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from threeds.config import (
    SelectConfig,
    add_arguments,
    check_settings,
    dest_of,
    first_problem,
)
from threeds.errors import SettingsError, ThreedsError
from threeds.io.data import MAX_DEPTH, DataError, nesting_problem, read_text, write_json
from threeds.io.lock import locked
from threeds.names import (
    ANSWER_FLAG_NAMES,
    METRIC_NAMES,
    METRICS,
    metric_column,
)
from threeds.rundir import layout
from threeds.rundir.check import (
    RESCORE,
    load_scored,
    read_manifest,
    read_scored_records,
)
from threeds.rundir.read import RunFileError, read_ratings
from threeds.selection.answer_flags import AnswerFlags, run_answer_flags
from threeds.selection.arrays import resolve_device, storage_dtype
from threeds.selection.kcenter import (
    NAN_REASONS,
    NonFiniteError,
    band_filter,
)
from threeds.selection.pick_order import PickOrder
from threeds.selection.quality import quality_mask
from threeds.selection.verdicts import in_plain_words

PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERDICTS = ("picked", "not picked", "dropped", "pick pending")  # the last: k-center still running (the app)
FUNNEL = ("rated", "kept by quality", "scored", "A' not flagged", "in all bands", "picked")


class SelectionError(ThreedsError, ValueError):
    """A selection that cannot be applied: one line naming the setting, file or id."""


class SelectionSettingError(SelectionError, SettingsError):
    """A selection setting out of its range: a usage error (exit status 2), as on the command line."""


def check(config: SelectConfig) -> None:
    """Raise SelectionSettingError naming the first setting out of range (`threeds.config.problems`' rules)."""
    line = first_problem(config)
    if line is not None:
        raise SelectionSettingError(line)


# ------------------------------------------------------------------------------ stages 1-3


def quality_per_row(ratings: pd.DataFrame | None, ids: Sequence[str]) -> np.ndarray | None:
    """Stage-1 score of every scored sample (NaN: not rated); None for a run without ratings."""
    if ratings is None:
        return None
    if ratings.empty:
        return np.full(len(ids), np.nan)
    last_first = pa.array(ratings["id"].astype(str))[::-1]  # an id's last rating is its first here
    found = pc.index_in(pa.array(pd.Series(ids).astype(str)), value_set=last_first)  # Arrow's hash table: 1.9M ids in ~1 s
    where = pc.fill_null(found, -1).to_numpy(zero_copy_only=False)
    scores = ratings["score"].to_numpy(dtype=float)[::-1]
    return np.where(where >= 0, scores[where], np.nan)


@dataclass(frozen=True)
class Filtered:
    """Stages 1-3 (cheap: what a slider recomputes); rows index metrics.parquet."""

    quality_ok: np.ndarray  # bool per row: rated >= threshold (all True without a threshold)
    flagged: dict[str, np.ndarray]  # per flag of exclude_flags: bool per row, A' carries it
    pool: np.ndarray  # bool per row: kept by quality and not flagged, what the bands' percentiles are taken over
    in_bands: np.ndarray  # bool per row: in the pool and inside all three bands
    excluded: np.ndarray  # bool per row: an exclude rule names it
    included: np.ndarray  # bool per row: an include rule names it
    candidates: np.ndarray  # rows k-center chooses among, ascending
    initial: np.ndarray  # positions in `candidates` of the include ids, in rule order
    report: dict  # `band_filter`'s report over the pool
    quality: np.ndarray | None  # Stage-1 score per row (None: the run has no ratings)


def pool_rows(config: SelectConfig, n: int, quality: np.ndarray | None, flags: AnswerFlags | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(quality_ok, pool), bool per row: the rows kept by the quality threshold and, among them,
    those whose A' carries none of the excluded flags: what the bands' percentiles are taken over."""
    if config.exclude_flags and flags is None:
        raise SelectionError("excluding flagged answers needs the run's A' (data.jsonl) and manifest")
    if config.quality_threshold is None:
        quality_ok = np.ones(n, dtype=bool)
    elif quality is None:
        raise SelectionError("a quality threshold needs the run's Stage-1 ratings, and this run has no ratings.jsonl")
    else:
        quality_ok = quality_mask(quality, config.quality_threshold)
    return quality_ok, quality_ok & ~flags.any_of(config.exclude_flags) if flags is not None else quality_ok


def column_order(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A metric column's finite values ascending (float64) and their rows: made once per run, it
    gives any pool's sorted values by one gather (`sorted_pool`) instead of a sort or partition."""
    values = np.asarray(values, dtype=np.float64)
    rows = np.flatnonzero(np.isfinite(values))
    order = rows[np.argsort(values[rows])].astype(np.int32 if len(values) < 2**31 else np.int64)
    return values[order], order


def sorted_pool(orders: Mapping[str, tuple[np.ndarray, np.ndarray]], pool: np.ndarray) -> dict[str, np.ndarray]:
    """Per metric, the finite values of the `pool` rows (bool per row) ascending, from each
    metric's `column_order`: what `filter_rows` takes as `sorted_finite`."""
    return {metric: values[pool[order]] for metric, (values, order) in orders.items()}


def filter_rows(config: SelectConfig, metrics: pd.DataFrame, quality: np.ndarray | None, flags: AnswerFlags | None = None,
                sorted_finite: Mapping[str, np.ndarray] | None = None) -> Filtered:  # fmt: skip
    """Apply the quality threshold, the flag rule, the bands and the id rules of `config` (no
    k-center). `flags` (the run's, `threeds.selection.answer_flags`) is needed only when the config
    excludes some. `sorted_finite` (per metric, the finite values of the pool's rows sorted, `sorted_pool`: the app
    keeps them while only the bands move) spares the percentiles' O(n) work; same result."""
    check(config)
    n = len(metrics)
    quality_ok, pool = pool_rows(config, n, quality, flags)
    flagged = {name: flags.masks[name] for name in config.exclude_flags} if flags is not None else {}
    in_bands, report = band_filter(metrics, config.bands(), config.atten_method, sorted_finite, pool)  # no row copied
    row_of = pd.Index(metrics["id"].astype(str)) if config.include or config.exclude else None  # only a rule needs it
    include = _rule_rows(row_of, config.include, "include")
    excluded, included = _mask(n, _rule_rows(row_of, config.exclude, "exclude")), _mask(n, include)
    candidates = np.flatnonzero((in_bands & ~excluded) | included)
    initial = np.searchsorted(candidates, include)
    return Filtered(quality_ok, flagged, pool, in_bands, excluded, included, candidates, initial.astype(np.int64), report, quality)


def _rule_rows(row_of: pd.Index | None, ids: Sequence[str], rule: str) -> np.ndarray:
    """Rows of the ids a rule names, in its order (`row_of`: the run's ids, None when no rule names any)."""
    if not ids:
        return np.empty(0, dtype=np.int64)
    rows = row_of.get_indexer(list(ids))
    if (rows < 0).any():
        missing = [i for i, r in zip(ids, rows) if r < 0]
        raise SelectionError(f"{rule} rule: {len(missing)} id(s) are not scored samples of this run, e.g. {missing[0]!r}")
    return rows


def _mask(n: int, rows: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


# ------------------------------------------------------------------------------ stage 4


def pick_count(config: SelectConfig) -> int:
    """How many k-center picks: sample_num, or every include id when there are more."""
    return max(config.sample_num, len(config.include))


def pick_rows(config: SelectConfig, filtered: Filtered, embeddings: np.ndarray, run_dir: Path | None = None,
              device=None, dtype=None, progress: bool = False) -> np.ndarray:  # fmt: skip
    """Rows picked by k-center greedy, in pick order (include ids first); with `run_dir`, the order
    is kept there for the app (`threeds.selection.pick_order`)."""
    chosen = np.ascontiguousarray(embeddings[filtered.candidates])
    order = PickOrder(chosen, config.seed, filtered.initial, run_dir, device, dtype)
    return filtered.candidates[order.picks(pick_count(config), progress)]


# ------------------------------------------------------------------------------ verdicts


@dataclass(frozen=True)
class Selection:
    """A config applied to a run: the picks, the funnel, and per scored sample why."""

    config: SelectConfig
    ids: np.ndarray  # per row of metrics.parquet
    picked: np.ndarray  # rows in pick order
    rank: np.ndarray  # per row: pick rank 1.., 0 = not picked
    verdict: np.ndarray  # per row: one of VERDICTS
    reason: np.ndarray  # per row: why, in words ("quality 70 < 85; ...")
    funnel: dict  # FUNNEL label -> count (None where the run cannot say)
    report: dict  # band_filter's report

    @property
    def picked_ids(self) -> list[str]:
        return [str(i) for i in self.ids[self.picked]]


def ordinal(value: float) -> str:
    """25 -> '25th', 1 -> '1st', 22.5 -> '22.5th'."""
    if not float(value).is_integer():
        return f"{value:g}th"
    v = int(value)
    suffix = "th" if 10 <= v % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(v % 10, "th")
    return f"{v}{suffix}"


def reasons(config: SelectConfig, metrics: pd.DataFrame, quality: np.ndarray | None, filtered: Filtered) -> np.ndarray:
    """Per row, every stage that drops it, joined by '; ' ('' where none does). Rows dropped by the
    same stages share one string (at 1.9M rows: a few hundred texts, not 1.9M); only a failed
    quality threshold, which names the row's own score, is written row by row."""
    stages: list[tuple[np.ndarray, str]] = [(filtered.excluded, "excluded by rule")]
    threshold = config.quality_threshold
    if threshold is not None:
        q = np.asarray(quality, dtype=float)
        stages += [(np.isnan(q), "not rated"), (~filtered.quality_ok & ~np.isnan(q), _SCORE)]
    stages += [(mask, f"A' {ANSWER_FLAG_NAMES[name]}") for name, mask in filtered.flagged.items()]
    for metric, (low, up) in config.bands().items():
        info = filtered.report["metrics"][metric]
        values = metrics[metric_column(metric, config.atten_method)].to_numpy(dtype=float)
        name = METRIC_NAMES[metric]
        stages.append((~np.isfinite(values), f"{name}: no value ({NAN_REASONS[metric]})"))
        if info["lo"] is not None:
            with np.errstate(invalid="ignore"):
                stages += [(values < info["lo"], f"{name} below the {ordinal(low)} percentile"),
                           (values > info["hi"], f"{name} above the {ordinal(up)} percentile")]  # fmt: skip
    bits = np.zeros(len(metrics), dtype=np.int64)
    for i, (mask, _) in enumerate(stages):
        bits |= np.asarray(mask, dtype=np.int64) << i
    combos, codes = np.unique(bits, return_inverse=True)
    texts = np.array(["; ".join(text for i, (_, text) in enumerate(stages) if combo >> i & 1) for combo in combos], dtype=object)
    out = texts[codes]
    if threshold is not None:
        rows = np.flatnonzero(~filtered.quality_ok & ~np.isnan(q))
        out[rows] = [out[r].replace(_SCORE, f"quality {q[r]:g} < {threshold:g}") for r in rows]
    return out


_SCORE = "\0score\0"  # stands for "quality <the row's score> < <threshold>" until it is written


def explain(
    config: SelectConfig, metrics: pd.DataFrame, ratings: pd.DataFrame | None, filtered: Filtered, picked: np.ndarray | None
) -> Selection:
    """Verdict, reasons, rank and funnel for picks made under `config`; `picked` None while the
    picks are still being made (the app's background k-center): every candidate is then
    "pick pending", and the funnel counts the picks there will be."""
    n = len(metrics)
    pending = picked is None
    picked = np.empty(0, dtype=np.int64) if pending else picked
    rank = np.zeros(n, dtype=np.int64)
    rank[picked] = np.arange(1, len(picked) + 1)
    why = reasons(config, metrics, filtered.quality, filtered)
    kept = why == ""
    labels = np.array(["picked", VERDICTS[3] if pending else "not picked", "dropped"], dtype=object)
    verdict = labels[np.where(rank > 0, 0, np.where(kept, 1, 2))]  # three strings shared by every row
    k = min(pick_count(config), len(filtered.candidates)) if pending else len(picked)
    why[(rank == 0) & kept] = "in all bands; the k-center picks are being made" if pending else f"in all bands; not among the {k:,} k-center picks"
    dropped_but_kept = filtered.included & (why != "")
    why[dropped_but_kept] = ["always include (rule) over: " + w for w in why[dropped_but_kept]]
    why[filtered.included & (why == "")] = "always include (rule)"
    plain = (rank > 0) & ~filtered.included
    why[plain] = [f"k-center pick #{r}" for r in rank[plain]]
    return Selection(config, metrics["id"].to_numpy(dtype=str), picked, rank, verdict, why, funnel(ratings, config, filtered, k), filtered.report)


def funnel(ratings: pd.DataFrame | None, config: SelectConfig, filtered: Filtered, picked: int) -> dict:
    """rated -> kept by quality -> scored (among those kept) -> A' not flagged -> in all bands -> picked.

    rated / kept by quality count every rated record; None where the run or config cannot say
    (A' not flagged: None without a flag rule)."""
    rated = kept = None
    if ratings is not None:
        scores = ratings["score"].to_numpy(dtype=float)
        rated = int(np.isfinite(scores).sum())
        if config.quality_threshold is not None:
            kept = int((scores[np.isfinite(scores)] >= config.quality_threshold).sum())
    return {
        "rated": rated,
        "kept by quality": kept,
        "scored": int(filtered.quality_ok.sum()),
        "A' not flagged": int(filtered.pool.sum()) if config.exclude_flags else None,
        "in all bands": int((filtered.in_bands & ~filtered.excluded).sum()),
        "picked": picked,
    }


def empty_reason(config: SelectConfig, counts: dict) -> str | None:
    """For a selection that picks nothing, the step that emptied it and what to change, in words
    (the app's warning on every page, the CLI's line); None when it picks some."""
    if counts["picked"]:
        return None
    if counts["scored"] == 0:
        if config.quality_threshold is None:
            return "the run has no scored sample"
        return f"the quality threshold {config.quality_threshold:g} keeps none of the scored samples; lower it"
    if counts.get("A' not flagged") == 0:
        names = ", ".join(ANSWER_FLAG_NAMES[n] for n in config.exclude_flags)
        return f"excluding A' flagged ({names}) leaves none of the {counts['scored']:,} samples kept by quality; exclude fewer flags"
    rule = " outside the exclude rule" if config.exclude else ""
    return f"no sample lies inside all three percentile bands{rule}; widen a band"


def apply(config: SelectConfig, metrics: pd.DataFrame, embeddings: np.ndarray, ratings: pd.DataFrame | None = None,
          flags: AnswerFlags | None = None, **kcenter) -> Selection:  # fmt: skip
    """The whole selection on loaded run files (metrics, embeddings, optional ratings and A' flags);
    `kcenter`: `pick_rows`' keywords."""
    quality = quality_per_row(ratings, metrics["id"])
    filtered = filter_rows(config, metrics, quality, flags)
    return explain(config, metrics, ratings, filtered, pick_rows(config, filtered, embeddings, **kcenter))


# ------------------------------------------------------------------------------ the samples table


def percentile_ranks(values: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Per value, the % of the finite `among` values at or below it (NaN where the value is not finite)."""
    ref = np.sort(np.asarray(among, dtype=float)[np.isfinite(among)])
    values = np.asarray(values, dtype=float)
    if ref.size == 0:
        return np.full(len(values), np.nan)
    order = np.argsort(values, kind="stable")  # sorted queries: the search walks `ref` once (1.9M rows: 4x faster)
    ranks = np.empty(len(values))
    ranks[order] = 100.0 * np.searchsorted(ref, values[order], side="right") / ref.size
    return np.where(np.isfinite(values), ranks, np.nan)


def sample_table(chosen: Selection, metrics: pd.DataFrame, quality: np.ndarray | None, pool: np.ndarray,
                 flags: AnswerFlags | None = None) -> pd.DataFrame:  # fmt: skip
    """One row per scored sample: id, quality, the flags on its A' ('' when none or unknown), each
    metric with its percentile rank among the pool (`Filtered.pool`: what the bands cut), verdict,
    why, the why in plain words (`threeds.selection.verdicts`) and pick rank (0 = not picked)."""
    codes, whys = pd.factorize(chosen.reason)  # a few distinct whys; each put in words once
    meaning_codes, meanings = pd.factorize(np.asarray([in_plain_words(why) for why in whys], dtype=object))
    table = {  # texts as categories (codes into a few distinct strings): 1.9M rows cost bytes a row, not a string each
        "id": metrics["id"].array, "verdict": pd.Categorical(chosen.verdict), "why": pd.Categorical.from_codes(codes, whys),
        "in plain words": pd.Categorical.from_codes(meaning_codes[codes], meanings), "pick": chosen.rank,
        "quality": np.full(len(metrics), np.nan) if quality is None else quality,
        "A' flags": pd.Categorical(np.full(len(metrics), "", dtype=object) if flags is None else flags.labels()),
    }  # fmt: skip
    for metric in METRICS:
        values = metrics[metric_column(metric, chosen.config.atten_method)].to_numpy(dtype=float)
        table[METRIC_NAMES[metric]] = values
        table[f"{METRIC_NAMES[metric]} %"] = percentile_ranks(values, values[pool])
    return pd.DataFrame(table)


# ------------------------------------------------------------------------------ comparing two selections


def overlap(a: Sequence[str], b: Sequence[str]) -> dict[str, list[str]]:
    """Ids picked by both, only by A, only by B (each in its selection's pick order)."""
    in_a, in_b = set(a), set(b)
    return {"both": [i for i in a if i in in_b], "only A": [i for i in a if i not in in_b], "only B": [i for i in b if i not in in_a]}


def difference_table(a: Selection, b: Selection) -> pd.DataFrame:
    """The ids picked by exactly one of A and B, with each side's verdict, pick rank and why
    (empty where the id is not a scored sample of that side's run)."""
    parts = overlap(a.picked_ids, b.picked_ids)
    ids = parts["only A"] + parts["only B"]
    frame = pd.DataFrame({"id": ids, "picked by": ["A"] * len(parts["only A"]) + ["B"] * len(parts["only B"])})
    for side, chosen in (("A", a), ("B", b)):
        rows = pd.Index(chosen.ids).get_indexer(ids)
        found = rows >= 0
        frame[f"{side} pick"] = np.where(found, chosen.rank[rows], 0)
        frame[f"{side} verdict"] = np.where(found, chosen.verdict[rows], "")
        frame[f"{side} why"] = np.where(found, chosen.reason[rows], "not a scored sample of this run")
    return frame


# ------------------------------------------------------------------------------ run directory and CLI


def read_run_ratings(run_dir: Path, config: SelectConfig) -> pd.DataFrame | None:
    """ratings.jsonl when the config has a quality threshold; a clear error when it is missing."""
    if config.quality_threshold is None:
        return None
    path = run_dir / layout.RATINGS
    if not path.is_file():
        raise SelectionError(f"{path}: not found; --quality-threshold needs the run's Stage-1 ratings (rate first, or drop the threshold)")
    try:
        return read_ratings(path)
    except RunFileError as exc:
        raise SelectionError(f"{path}: {exc}") from None


def select_dir(run_dir: str | os.PathLike, config: SelectConfig, device=None, dtype=None, progress: bool = False) -> dict:
    """`threeds select`: apply `config` to a run directory, write and return selection.json's content.

    Returns {"params", "report", "selected_ids", "selected_rows"}; ids and rows (indices into
    metrics.parquet) in pick order. NaN/inf embeddings among k-center's candidates are a broken
    run file (RunFileError naming embeddings.npy), not a setting the user can fix.
    """
    run_dir = Path(run_dir)
    check(config)
    with locked(run_dir, create=False):  # one writer of the run directory (selection.json)
        metrics, embeddings = load_scored(run_dir)  # ids unique and aligned across the run's files
        return _select_into(run_dir, config, metrics, embeddings, device, dtype, progress)


def read_run_flags(run_dir: Path, config: SelectConfig, metrics: pd.DataFrame) -> AnswerFlags | None:
    """The run's flags on A' when the config excludes some (data.jsonl's answers, the manifest's cap)."""
    if not config.exclude_flags:
        return None
    manifest_path = run_dir / layout.MANIFEST
    manifest = read_manifest(manifest_path) if manifest_path.is_file() else {}
    records = read_scored_records(run_dir, metrics["id"].tolist())
    return run_answer_flags(run_dir, metrics, records, manifest)


def _select_into(run_dir: Path, config: SelectConfig, metrics: pd.DataFrame, embeddings: np.ndarray, device, dtype,
                 progress: bool) -> dict:  # fmt: skip
    ratings, flags = read_run_ratings(run_dir, config), read_run_flags(run_dir, config, metrics)
    device = resolve_device(device)
    start = time.perf_counter()
    try:
        chosen = apply(config, metrics, embeddings, ratings, flags, run_dir=run_dir, device=device, dtype=dtype, progress=progress)
    except NonFiniteError as exc:
        raise RunFileError(f"{exc} in rows k-center chooses among; {RESCORE}", path=run_dir / layout.EMBEDDINGS) from exc
    report = dict(chosen.report, n_selected=len(chosen.picked), kcenter_seconds=round(time.perf_counter() - start, 3))
    report["funnel"] = chosen.funnel
    recorded = config.recorded()
    recorded["bands"] = {m: list(b) for m, b in recorded["bands"].items()}
    result = {
        "params": {**recorded, "device": str(device), "dtype": storage_dtype(dtype)},
        "report": report,
        "selected_ids": chosen.picked_ids,
        "selected_rows": [int(r) for r in chosen.picked],
    }
    write_json(run_dir / layout.SELECTION, result)
    return result


def add_select_flags(parser: argparse.ArgumentParser) -> None:
    """`--preset NAME` plus one flag per SelectConfig field; a flag given wins over the preset."""
    parser.add_argument("--preset", help=f"start from the named selection saved in RUN/{layout.PRESETS}/NAME.json (by the app)")
    add_arguments(parser, SelectConfig, defaults=False)  # an absent flag leaves no attribute: the preset's value stays


def config_from_args(args: argparse.Namespace, run_dir: str | os.PathLike) -> SelectConfig:
    """The preset (or the defaults) with every flag that was given on top."""
    base = load_preset(run_dir, args.preset) if getattr(args, "preset", None) else SelectConfig()
    given = {f.name: getattr(args, dest_of(SelectConfig, f.name)) for f in dataclasses.fields(SelectConfig) if hasattr(args, dest_of(SelectConfig, f.name))}
    return check_settings(dataclasses.replace(base, **given))


# ------------------------------------------------------------------------------ presets


def config_to_json(config: SelectConfig) -> dict:
    return {f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v for f in dataclasses.fields(config)}


def preset_path(run_dir: str | os.PathLike, name: str) -> Path:
    if not PRESET_NAME.fullmatch(name or ""):
        raise SelectionError(f"preset name {name!r}: letters, digits, '.', '_' and '-' only (up to 64)")
    return Path(run_dir) / layout.PRESETS / f"{name}.json"


def save_preset(run_dir: str | os.PathLike, name: str, config: SelectConfig) -> Path:
    check(config)
    path = preset_path(run_dir, name)
    path.parent.mkdir(exist_ok=True)
    write_json(path, config_to_json(config))
    return path


def list_presets(run_dir: str | os.PathLike) -> list[str]:
    folder = Path(run_dir) / layout.PRESETS
    return sorted(p.stem for p in folder.glob("*.json") if PRESET_NAME.fullmatch(p.stem)) if folder.is_dir() else []


def load_preset(run_dir: str | os.PathLike, name: str) -> SelectConfig:
    path = preset_path(run_dir, name)
    if not path.is_file():
        known = list_presets(run_dir)
        raise SelectionError(f"{path}: no such preset" + (f"; saved ones: {', '.join(known)}" if known else " (none saved)"))
    try:
        text = read_text(path)
        problem = nesting_problem(text, MAX_DEPTH)
        obj = json.loads(text, parse_constant=_no_constant) if problem is None else None
    except DataError as exc:  # too big, not UTF-8
        raise SelectionError(str(exc)) from None
    except ValueError as exc:
        raise SelectionError(f"{path}: not valid JSON ({exc})") from None
    if problem:
        raise SelectionError(f"{path}: not valid JSON ({problem})")
    try:
        return SelectConfig.from_dict(obj, str(path))
    except SettingsError as exc:  # a bad file: bad input (exit status 1), not a bad flag
        raise SelectionError(str(exc)) from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
