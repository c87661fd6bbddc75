"""What every page shares: the current run, state kept across pages, cached library calls.

Heavy things are cached so a slider re-render only redoes cheap work: the loaded run
(`st.cache_resource`, keyed by the run's file stamps so a re-scored run reloads), the band filter
per band setting, histogram counts per column, the UMAP map and k-center pick orders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import streamlit as st

from threeds.embed_map import PickOrder, load_or_compute_umap
from threeds.errors import describe
from threeds.names import ATTEN_METHODS, METRIC_NAMES, METRICS, metric_column
from threeds.runs import DEFAULT_CACHE, Run, list_runs, load_run, run_key, run_settings
from threeds.select import DEFAULT_BAND, band_filter

INSPECTOR = "app_pages/inspector.py"
DEFAULTS = {
    "atten_method": "mean",
    "quality_threshold": 85.0,
    "sample_num": 5000,
    "seed": 0,
    **{f"band_{m}": DEFAULT_BAND for m in METRICS},
}
# Widget keys that must survive page switches: Streamlit drops a widget's state when a page
# without that widget runs, unless the key is re-assigned on every run (its documented workaround).
PERSISTENT = (*DEFAULTS, "run_name", "inspect_id", "ins_ppl_log")


def page_config() -> None:
    """Before `st.navigation`: a page config already set keeps the browser from taking the page's
    Material icon as the favicon, which it would fetch from fonts.gstatic.com (an emoji icon is an
    inline SVG; the app fetches nothing from the internet)."""
    st.set_page_config(page_title="threeds", page_icon="🩺", layout="wide")


def setup() -> None:
    """State kept across pages and the run picker (app.py, before any page)."""
    keep_state()
    run_picker()


def keep_state() -> None:
    for key in PERSISTENT:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)


# ---------------------------------------------------------------------------------- the run


@st.cache_resource(max_entries=4, show_spinner="Loading the run…")
def _load(path: str, key: tuple) -> Run:
    return load_run(path)


def cache_dir() -> Path:
    """Where runs live: `cache/`, or THREEDS_CACHE (tests, or a cache elsewhere)."""
    return Path(os.environ.get("THREEDS_CACHE", DEFAULT_CACHE))


def run_names() -> list[str]:
    return [p.name for p in list_runs(cache_dir())]


def run_picker() -> None:
    names = run_names()
    if not names:
        st.sidebar.caption("No runs in cache/ yet.")
        return
    if "next_run" in st.session_state:  # set by switch_run: applied before the widget exists
        st.session_state["run_name"] = st.session_state.pop("next_run")
    if st.session_state.get("run_name") not in names:
        st.session_state["run_name"] = "demo" if "demo" in names else names[0]
    st.sidebar.selectbox("Run", names, key="run_name")
    if st.session_state.get("settings_of") != st.session_state["run_name"]:
        start_from_run_settings()


def start_from_run_settings() -> None:
    """On opening a run, set the sliders to what the run itself used (else the defaults)."""
    run = current_run()
    st.session_state["settings_of"] = st.session_state["run_name"]
    found = run_settings(run) if run is not None else {}
    for key, value in DEFAULTS.items():
        st.session_state[key] = value
    for metric, band in found.pop("bands", {}).items():
        st.session_state[f"band_{metric}"] = band
    st.session_state.update(found)


def switch_run(name: str) -> None:
    """Make `name` the current run (the picker cannot be set once drawn: rerun and set it first)."""
    st.session_state["next_run"] = name
    st.rerun()


def current_run() -> Run | None:
    name = st.session_state.get("run_name")
    path = cache_dir() / name if name else None
    if path is None or not path.is_dir():
        return None
    return _load(str(path), run_key(path))


def require_run() -> Run:
    """The current run, or an explanation and a stop when there is none."""
    run = current_run()
    if run is None:
        st.info("No run yet. Open **Runs** to start one (or make the demo run, see the README).")
        st.stop()
    return run


REQUIRED_FILES = {
    "ratings.jsonl": ("ratings", "Stage-1 ratings"),
    "metrics.parquet": ("metrics", "Stage-2 metrics"),
    "embeddings.npy": ("embeddings", "instruction embeddings"),
    "data.jsonl": ("records", "scored records"),
}


def require(run: Run, *files: str) -> None:
    """Stop the page with a clear message when one of `files` is corrupt or its stage has not run."""
    for file in files:
        attr, what = REQUIRED_FILES[file]
        if file in run.errors:
            st.error(f"Cannot use this run's {what}: {md(run.errors[file])}")
            st.stop()
        if getattr(run, attr) is None:
            st.info(f"Run {code(run.name)} has no {what} yet (`{file}` is missing). Start or resume the run on **Runs**.")
            st.stop()


def key_of(run: Run) -> tuple:
    """Cache key for what is computed from `run`: the file stamps it was loaded with."""
    return run.key


# ---------------------------------------------------------------------------------- selection state


def bands() -> dict[str, tuple[float, float]]:
    return {m: tuple(st.session_state[f"band_{m}"]) for m in METRICS}


def band_key() -> tuple:
    return tuple(bands()[m] for m in METRICS)


@st.cache_data(max_entries=256, show_spinner=False)
def _band_filter(_run: Run, key: tuple, band_values: tuple, atten_method: str) -> tuple[np.ndarray, dict]:
    return band_filter(_run.metrics, dict(zip(METRICS, band_values)), atten_method)


def band_result(run: Run) -> tuple[np.ndarray, dict]:
    """`threeds.select.band_filter` for the bands and attention method set on the pages."""
    return _band_filter(run, key_of(run), band_key(), st.session_state["atten_method"])


@st.cache_resource(max_entries=32, show_spinner=False)
def _pick_order(_run: Run, key: tuple, band_values: tuple, atten_method: str, seed: int) -> PickOrder:
    mask, _ = _band_filter(_run, key, band_values, atten_method)
    return PickOrder(np.ascontiguousarray(_run.embeddings[mask]), seed=seed)


def picks(run: Run, sample_num: int) -> np.ndarray:
    """Rows of metrics.parquet that k-center greedy picks, in pick order, for the current bands."""
    mask, _ = band_result(run)
    survivors = np.flatnonzero(mask)
    order = _pick_order(run, key_of(run), band_key(), st.session_state["atten_method"], st.session_state["seed"])
    with st.spinner("k-center greedy…"):
        return survivors[order.picks(sample_num)]


def sample_num_slider(run: Run) -> int:
    """The shared sample_num slider (Embedding map, Export); clamped to the band survivors."""
    n = int(band_result(run)[0].sum())
    if n == 0:
        st.warning("No sample lies inside all three bands; widen a band on **Difficulty**.")
        st.stop()
    st.session_state["sample_num"] = max(1, min(int(st.session_state["sample_num"]), n))
    if n == 1:
        return 1
    return st.slider("sample_num (k-center picks)", 1, n, key="sample_num", help=f"{n:,} samples survive the bands")


def atten_toggle() -> str:
    return st.radio(
        "Attention aggregation", ATTEN_METHODS, key="atten_method", horizontal=True,
        help="mean: column sum over query rows / rows that see the key; max: max over query rows (spec item 4)",
    )  # fmt: skip


def metric_label(metric: str) -> str:
    return f"{METRIC_NAMES[metric]} ({metric_column(metric, st.session_state['atten_method'])})"


# ---------------------------------------------------------------------------------- cached views


@st.cache_data(max_entries=64, show_spinner=False)
def histogram(
    _values: np.ndarray, key: tuple, bins: int = 60, log: bool = False, span: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) over the finite values, between `span` or the data's min and max;
    log-spaced edges for a log axis."""
    v = np.asarray(_values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)] if log else v[np.isfinite(v)]
    if v.size == 0:
        return np.zeros(0), np.zeros(1)
    lo, hi = span or (float(v.min()), float(v.max()))
    if hi == lo:
        hi = lo + (abs(lo) or 1.0) * 1e-6
    edges = np.geomspace(lo, hi, bins + 1) if log else np.linspace(lo, hi, bins + 1)
    return np.histogram(v, bins=edges)[0], edges


@st.cache_data(max_entries=16, show_spinner=False)
def display_rows(n: int, cap: int, seed: int = 0) -> np.ndarray:
    """A fixed random subset of rows to draw when there are too many points for the browser."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


@st.cache_resource(max_entries=4, show_spinner="Computing the UMAP map (once per run; cached as umap.npy)…")
def umap_coords(_run: Run, key: tuple) -> np.ndarray:
    return load_or_compute_umap(_run.path, _run.embeddings)


def short(text: str, n: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def open_inspector(sample_id: str) -> None:
    st.session_state["inspect_id"] = sample_id
    st.switch_page(INSPECTOR)


def one_line_error(exc: BaseException) -> str:
    """The same one line the command line prints for this failure (`threeds.errors.describe`)."""
    return describe(exc)[0]


_MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]<>~$:|!&])")  # special anywhere in a line
_MARKDOWN_LEADING = re.compile(r"^(\s*)([#>+=-]|\d+[.)])")  # special at the start of one


def md(text: object) -> str:
    """User-controlled text (ids, run names, file names, messages quoting them) made literal in
    Streamlit markdown: emphasis, code, links, HTML, LaTeX (`$`), emoji and colour directives (`:`)
    and line-start markers (headings, lists, quotes) are escaped; line breaks become spaces."""
    escaped = _MARKDOWN_INLINE.sub(r"\\\1", " ".join(str(text).splitlines()))
    return _MARKDOWN_LEADING.sub(lambda m: m.group(1) + "\\" + m.group(2), escaped)


def code(text: object) -> str:
    """User-controlled text as an inline code span (ids, names): literal whatever it holds, the
    fence one backtick longer than any run of backticks inside it."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
