"""What every page shares: the current run and its picker, cached library calls, shared widgets.
The selection, brush, URL and presets are kept by `app_pages.state`.

Heavy things are cached so a slider re-render only redoes cheap work: the loaded run
(`st.cache_resource`, keyed by the run's file stamps so a re-scored run reloads), the band filter
per band setting, histogram counts per column, the UMAP map and k-center pick orders.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from app_pages import pick_jobs, state
from threeds.config import SelectConfig
from threeds.errors import describe
from threeds.names import ATTEN_METHODS, METRIC_NAMES, METRICS, metric_column
from threeds.rundir import layout
from threeds.rundir.progress import duration, eta_seconds, run_time_left
from threeds.rundir.read import (
    DEFAULT_CACHE,
    Run,
    list_runs,
    load_run,
    run_key,
    run_settings,
)
from threeds.selection.answer_flags import AnswerFlags, run_answer_flags
from threeds.selection.apply import (
    Filtered,
    Selection,
    SelectionError,
    column_order,
    empty_reason,
    explain,
    filter_rows,
    funnel,
    list_presets,
    pick_count,
    pool_rows,
    quality_per_row,
    sorted_pool,
)
from threeds.selection.pick_order import PickOrder
from threeds.views.embed_map import load_or_compute_umap

INSPECTOR = "app_pages/inspector.py"
INSPECTOR_PATH = "inspector"  # its URL path


def page_config() -> None:
    """Before `st.navigation`: a page config already set keeps the browser from taking the page's
    Material icon as the favicon, which it would fetch from fonts.gstatic.com (an emoji icon is an
    inline SVG; the app fetches nothing from the internet)."""
    st.set_page_config(page_title="threeds", page_icon="🩺", layout="wide")


def setup(page_path: str) -> None:
    """State kept across pages, a link's state, and the run picker (app.py, before any page)."""
    state.keep_state()
    state.read_url(run_names(), page_path)
    run_picker()


WHOLE_RUN = "whole_run"  # True while app.py runs the page: a fragment's rerun (app.py not run) finds it False


@contextmanager
def whole_run(page_path: str) -> Iterator[None]:
    """Around the page in app.py: marks the run as a whole one and, however it ends (st.stop, a
    rerun), puts the current view in the URL."""
    st.session_state[WHOLE_RUN] = True
    try:
        yield
    finally:
        st.session_state[WHOLE_RUN] = False
        write_url(page_path)


def fragment_wrote_url(page_path: str) -> None:
    """A fragment that changes the view (a brush, a search) writes the URL at the end of its own
    reruns, where app.py's `write_url` does not run; in a whole run app.py writes it."""
    if not st.session_state.get(WHOLE_RUN):
        write_url(page_path)


def write_url(page_path: str) -> None:
    """Put the current view in the query string (app.py, after the page, however it ended)."""
    run = current_run()
    config = selection_config(run) if run is not None else None
    state.write_url(st.session_state.get("run_name"), config, state.view(page_path, INSPECTOR_PATH))


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
        if st.session_state.get("settings_of"):  # switched from another run: the tuned selection stays
            keep_selection()
        else:  # the session's first run, or a link's (whose settings then go on top)
            start_from_run_settings()
    linked = state.pending()
    if linked is not None:
        state.set_selection(linked)
    state.apply_pending_brush()
    run = current_run()
    show_funnel(run)
    if run is not None:
        preset_panel(run)


def preset_panel(run: Run) -> None:
    """Save the current selection under a name in the run directory, or load a saved one."""
    with st.sidebar.expander("Presets (saved selections)"):
        saved = list_presets(run.path)
        if saved:
            st.selectbox("Saved", saved, key="preset_pick")
            st.button("Load", key="preset_load", on_click=state.load_preset_named, args=(run.path,))
        else:
            st.caption(f"None saved in `{run.name}/{layout.PRESETS}/` yet.")
        st.text_input("Name", key="preset_name", placeholder="e.g. narrow-bands")
        st.button("Save current selection", key="preset_save", on_click=state.save_preset_named, args=(run.path, run.ratings is not None))
        if st.session_state.get("preset_message"):
            st.caption(st.session_state.pop("preset_message"))


def start_from_run_settings() -> None:
    """On opening a run, set the sliders to what the run itself used (else the defaults)."""
    run = current_run()
    st.session_state["settings_of"] = st.session_state["run_name"]
    st.session_state[state.SELECTION] = state.from_run_settings(run_settings(run) if run is not None else {})
    state.clear_brush()


def keep_selection() -> None:
    """On switching runs, keep the selection: its bands are percentiles and its threshold a score,
    valid for any run. The brush (rows of the old run) goes; the include/exclude rules stay only
    if the new run has every id they name (a run over the same records)."""
    st.session_state["settings_of"] = st.session_state["run_name"]
    state.clear_brush()
    run = current_run()
    ids = set(run.metrics["id"]) if run is not None and run.metrics is not None else set()
    for kind in ("include", "exclude"):
        if not set(getattr(state.selection(), kind)) <= ids:
            state.change(**{kind: ()})
            st.sidebar.caption(f"The {kind} rule names samples run {code(run.name if run else '?')} lacks: cleared.")


def switch_run(name: str) -> None:
    """Make `name` the current run (the picker cannot be set once drawn: rerun and set it first)."""
    st.session_state["next_run"] = name
    st.rerun()


def current_run(name: str | None = None) -> Run | None:
    """The run picked in the sidebar (or the run `name`), loaded and cached."""
    name = name or st.session_state.get("run_name")
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
    layout.RATINGS: ("ratings", "Stage-1 ratings"),
    layout.METRICS: ("metrics", "Stage-2 metrics"),
    layout.EMBEDDINGS: ("embeddings", "instruction embeddings"),
    layout.DATA: ("records", "scored records"),
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


def selection_config(run: Run) -> SelectConfig:
    """The one selection every page shows and Export applies (`state.selection_config`)."""
    return state.selection_config(run.ratings is not None)


def _stages_key(config: SelectConfig) -> tuple:
    """What stages 1-3 depend on: every setting but sample_num."""
    return dataclasses.astuple(dataclasses.replace(config, sample_num=1))


@st.cache_resource(max_entries=4, show_spinner=False)
def quality_of(_run: Run, key: tuple) -> np.ndarray | None:
    """Stage-1 score per scored sample, once per run (a look-up by id over every rating)."""
    return quality_per_row(_run.ratings, _run.metrics["id"])


INLINE_ROWS = 20_000  # runs up to this size compute what a page shows while it waits (a second or two)


BACKGROUND_NICE = 10  # a background thread's niceness above the server's (Linux: per thread)


def in_background(work: Callable[[], Any], name: str) -> Future:
    """`work()` in a daemon thread of the server, its result (or exception) in the returned future:
    a daemon, so a server told to stop does not wait for it (a pool's threads it would). The thread
    runs BACKGROUND_NICE steps nicer than the server where the system allows it per thread
    (Linux), so on two cores it takes the CPU the pages leave: measured on the paper run, a
    background pass over data.jsonl at the server's priority made band moves 1.7x slower."""
    future: Future = Future()

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + BACKGROUND_NICE)
        except (AttributeError, OSError):
            pass  # not Linux, or not allowed: the thread keeps the server's priority
        try:
            future.set_result(work())
        except BaseException as exc:  # the page that waits raises it
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def ready_result(future: Future, rows: int, wait: bool, spinner: str) -> tuple[bool, Any]:
    """(True, the result) once `future` is done, or when the page waits for it (`wait`, or a run of
    at most INLINE_ROWS rows); (False, None) while a large run's result is still being computed."""
    if not future.done() and not wait and rows > INLINE_ROWS:
        return False, None
    with st.spinner(spinner):
        return True, future.result()


@st.fragment(run_every=pick_jobs.POLL_S)
def coming(future: Future, key: str, text: str) -> None:
    """Says what is being computed in the background; reruns the page once it is in."""
    if future.done():
        st.rerun()
    with st.container(key=key):
        st.caption(text)


@st.cache_resource(max_entries=4, show_spinner=False)
def _answer_flags(_run: Run, key: tuple) -> Future:
    """The run's flags, computed once per run in the background (seconds per 100k answers)."""
    return in_background(lambda: run_answer_flags(_run.path, _run.metrics, _run.records, _run.manifest), "threeds-flags")


def answer_flags(run: Run, wait: bool = True) -> AnswerFlags | None:
    """The run's flags on A' (`threeds.selection.answer_flags`), once per run; None without its
    scored records, or (`wait` False) while a large run's are still being computed in the
    background: what only shows them (counts, badges) does not wait, a rule that needs them does."""
    if run.metrics is None or run.records is None:
        return None
    return ready_result(_answer_flags(run, key_of(run)), len(run.metrics), wait, "Flagging the model's answers (once per run)…")[1]


def flags_coming(run: Run) -> None:
    """Says the flags on A' are being computed; reruns the page once they are in."""
    coming(_answer_flags(run, key_of(run)), "flags_pending",
           f"Flagging the model's answers in the background (once per run; {len(run.metrics):,} answers); every control works meanwhile…")  # fmt: skip


@st.cache_resource(max_entries=8, show_spinner=False)
def _column_order(_run: Run, key: tuple, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A metric column's finite values ascending and their rows, once per run (23 MB per column at 1.9M rows)."""
    return column_order(_run.metrics[column].to_numpy(dtype=np.float64))


@st.cache_resource(max_entries=2, show_spinner=False)
def _sorted_pool(_run: Run, key: tuple, pool: tuple, _config: SelectConfig, _flags: AnswerFlags | None) -> dict[str, np.ndarray] | None:
    """Per metric, the pool's finite values sorted, kept while only the bands move: a band move then
    finds its percentiles in constant time (np.percentile over 1.9M values took ~0.1 s a metric).
    None when a metric column is missing (filter_rows then names it)."""
    columns = {m: metric_column(m, _config.atten_method) for m in METRICS}
    if not set(columns.values()) <= set(_run.metrics.columns):
        return None
    in_pool = pool_rows(_config, len(_run.metrics), quality_of(_run, key), _flags)[1]
    return sorted_pool({m: _column_order(_run, key, c) for m, c in columns.items()}, in_pool)


@st.cache_resource(max_entries=64, show_spinner=False)
def _filtered(_run: Run, key: tuple, _config: SelectConfig, stages: tuple) -> Filtered:
    flags = answer_flags(_run) if _config.exclude_flags else None  # computed only when a rule needs them
    pool = (_config.quality_threshold, _config.exclude_flags, _config.atten_method)
    try:
        ordered = _sorted_pool(_run, key, pool, _config, flags)
    except SelectionError:
        ordered = None  # filter_rows says why
    return filter_rows(_config, _run.metrics, quality_of(_run, key), flags, ordered)


def filtered(run: Run, config: SelectConfig | None = None) -> Filtered:
    """Stages 1-3 (quality, bands, rules) of the current selection (or `config`); cached per setting."""
    config = config or selection_config(run)
    try:
        return _filtered(run, key_of(run), config, _stages_key(config))
    except SelectionError as exc:
        st.error(f"This selection cannot be applied: {exc}")
        st.stop()


@st.cache_resource(max_entries=32, show_spinner=False)
def _pick_order(_run: Run, key: tuple, _filtered: Filtered, stages: tuple, seed: int) -> PickOrder:
    rows = np.ascontiguousarray(_run.embeddings[_filtered.candidates])
    return PickOrder(rows, seed, _filtered.initial, _run.path)


def picks(run: Run, config: SelectConfig | None = None) -> np.ndarray | None:
    """Rows of metrics.parquet the current selection (or `config`) picks, in pick order: a slice of
    a k-center order kept per set of candidates, so moving sample_num costs no recomputation.
    None while a background job makes them (`pick_jobs`: large candidate sets); the page then
    says they are coming, with the job's progress, where this is called."""
    config = config or selection_config(run)
    done = filtered(run, config)
    k = min(pick_count(config), len(done.candidates))
    if pick_jobs.inline(len(done.candidates), run.embeddings.shape[1]):
        order = _pick_order(run, key_of(run), done, _stages_key(config), config.seed)
        with st.spinner("k-center greedy…"):
            return done.candidates[order.picks(k)]
    key = (str(run.path), key_of(run), _stages_key(config), config.seed)
    board = pick_jobs.board()
    found = board.ready(key, k)
    if found is None:
        board.request(key, k, pick_jobs.launcher(run.path, len(run.metrics), done.candidates, done.initial, config.seed, k))
        pending_picks(key, k, len(done.candidates))
    return found


@st.fragment(run_every=pick_jobs.POLL_S)
def pending_picks(key: tuple, k: int, candidates: int) -> None:
    """The picks are coming: the background job's progress, polled; the page reruns once they are in."""
    board = pick_jobs.board()
    if board.ready(key, k) is not None:
        st.rerun()
    failure = board.failure(key)
    with st.container(key="picks_pending"):
        if failure is not None:
            st.error(f"The k-center picks failed: {md(failure)}")
            st.button("Try again", key="picks_retry", on_click=board.retry, args=(key,))
            return
        job = board.running
        if job is None or job.key != key:  # ended, or replaced by another page's request: ask again
            st.rerun()
        progress = job.progress()
        done, total = int(progress.get("done", 0)), int(progress.get("total", k)) or 1
        st.progress(min(done / total, 1.0), text=f"The {k:,} k-center picks among {candidates:,} candidates are coming "
                    f"(made in the background; every control works meanwhile) · {progress_text(progress) if progress else 'starting'}")  # fmt: skip


@st.cache_resource(max_entries=8, show_spinner=False)
def _selection(_run: Run, key: tuple, config: tuple, _config: SelectConfig, _done: Filtered, picked: tuple | None, _picked: np.ndarray | None) -> Selection:
    return explain(_config, _run.metrics, _run.ratings, _done, _picked)


def selection(run: Run, config: SelectConfig | None = None) -> Selection:
    """The current selection (or `config`) applied to `run` with every sample's verdict, why and
    pick rank (`threeds.selection.apply.explain`; for the pages that show them); while the picks
    are made in the background, the candidates' verdict is "pick pending"."""
    config = config or selection_config(run)
    chosen = picks(run, config)
    state_of_picks = None if chosen is None else len(chosen)  # pending, or made: cached apart
    return _selection(run, key_of(run), dataclasses.astuple(config), config, filtered(run, config), state_of_picks, chosen)


def funnel_text(counts: dict) -> str:
    return " → ".join(f"{label} **{value:,}**" for label, value in counts.items() if value is not None)


def show_funnel(run: Run | None) -> None:
    """The current selection's funnel in the sidebar of every page (rated -> ... -> picked)."""
    if run is None:
        return
    if run.metrics is None or run.embeddings is None or run.errors.keys() & {layout.METRICS, layout.EMBEDDINGS}:
        if run.ratings is not None and layout.RATINGS not in run.errors:
            scores = run.ratings["score"].to_numpy(dtype=float)
            kept = int((scores[np.isfinite(scores)] >= state.selection().quality_threshold).sum())
            st.sidebar.markdown("**Selection**  \n" + funnel_text({"rated": int(np.isfinite(scores).sum()), "kept by quality": kept}))
        return
    done, config = filtered(run), selection_config(run)
    counts = funnel(run.ratings, config, done, min(pick_count(config), len(done.candidates)))  # no k-center needed
    st.sidebar.markdown("**Selection**  \n" + funnel_text(counts))
    reason = empty_reason(config, counts)
    if reason is not None:  # drawn before the page: at the top of every page
        st.warning(f"**This selection picks 0 samples:** {reason}.", icon=":material/warning:")


def selection_controls(run: Run) -> None:
    """The attention toggle and the sample_num slider side by side (Embedding map, Export)."""
    c1, c2 = st.columns([1, 2])
    with c1:
        atten_toggle()
    with c2:
        sample_num_slider(run)


def sample_num_slider(run: Run) -> None:
    """sample_num over 1 .. the k-center candidates; a sample_num above them (a link, the run's own
    setting) shows the slider's end and stays as it is: picking all candidates is what it means."""
    n = len(filtered(run).candidates)
    if n == 0:  # the warning at the top of the page says which step left none
        st.stop()
    wanted = state.selection().sample_num
    if n > 1:
        st.slider("sample_num (k-center picks)", 1, n, **state.bind("sample_num", min(wanted, n)), help=f"{n:,} samples pass quality, bands and rules")
    if wanted > n:
        st.caption(f"sample_num {wanted:,}: all {n:,} candidates are picked")


def atten_toggle() -> None:
    st.radio(
        "Attention aggregation", ATTEN_METHODS, horizontal=True, **state.bind("atten_method"),
        help="mean: column sum over query rows / rows that see the key; max: max over query rows (spec item 4)",
    )  # fmt: skip


def metric_label(metric: str) -> str:
    return f"{METRIC_NAMES[metric]} ({metric_column(metric, state.selection().atten_method)})"


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
    return load_or_compute_umap(_run.path, _run.embeddings, metrics=_run.metrics)


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


# ---------------------------------------------------------------------------------- background jobs


def progress_text(progress: dict) -> str:
    """'generate: 3 / 10 records · about 2 min left (updated 1 s ago)'."""
    done, total = int(progress.get("done", 0)), int(progress.get("total", 0))
    text = f"{progress.get('stage', '?')}: {done:,} / {total:,} {progress.get('unit', '')}".rstrip()
    eta = eta_seconds(progress)
    if eta is not None:
        text += f" · about {duration(eta)} left"
    whole = run_time_left(progress)
    if whole is not None and progress.get("ahead"):  # a threeds run: the stages still to come
        seconds, unmeasured = whole
        text += f"; the whole run: {'at least' if unmeasured else 'about'} {duration(seconds)}"
        text += f" ({', '.join(unmeasured)}: not measured yet)" if unmeasured else ""
    return text + f" (updated {time.time() - float(progress.get('updated', time.time())):.0f} s ago)"
