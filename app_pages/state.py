"""The app's state across pages: the selection (one SelectConfig), the brush, the URL and presets.

The selection lives in the session as one `SelectConfig` under SELECTION, the same object the
URL encodes, a preset stores and Export turns into `threeds select` flags; its defaults are
SelectConfig's own (the quality threshold: FilterConfig's, the threshold the run filtered with).
A widget never holds the selection: each draws a copy under its own key (`bind`) and writes a
change back in its callback. Streamlit drops a widget's state when a run (a fragment's rerun,
then another page) does not draw it; a copy lost that way is re-made from the selection, so a
brush on the map or a visit to any page cannot move a setting. A slider whose range is smaller
than the setting (sample_num above the k-center candidates) shows its end, and the setting stays.

The URL: after each run of the app the query string is rewritten from the session (`write_url`);
Streamlit's frontend pushes a browser history entry for each new query string, so every committed
change is a step back/forward can return to. The URL is read into the session (`read_url`) on the
first run of a session (a reload, a pasted link, a bookmark), when the page changes, and on
back/forward within a page (Streamlit marks such a run `is_history_navigation` on its script-run
context, the one value the app reads from Streamlit's internals: no public API says it, so
requirements.txt pins the versions that have it and tests/test_app.py checks it is there). Not
otherwise: while a slider is dragged the browser sends reruns that still carry the previous query
string, and reading those would move it back. Selection settings use SelectConfig's field names
and only appear when they differ from its defaults, so `?run=demo&quality_threshold=90&conf_up=80`
is a complete link. The view goes in too: the inspector's `id`, the Samples `search`, filters
(`verdict`, `why`, `flags`) and `sort`, the Difficulty page's log x (`logx`), and a `brush` (its rows
as a deflated bit mask, a few dozen characters for a run of thousands) with its label.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from threeds.config import FilterConfig, SelectConfig, format_value
from threeds.errors import SettingsError
from threeds.names import METRICS, SHORT_NAMES
from threeds.selection.apply import VERDICTS, SelectionError, load_preset, save_preset

SELECTION = "selection"  # the current SelectConfig
# Other widget keys that must survive page switches: Streamlit drops a widget's state when a page
# without that widget runs, unless the key is re-assigned on every run (its documented workaround).
PERSISTENT = ("run_name", "inspect_id", "ins_ppl_log", "inspect_atten", "samples_query", "samples_verdict", "samples_reason",
              "samples_flags", "samples_sort")  # fmt: skip
FIELDS = {f.name: f for f in dataclasses.fields(SelectConfig)}
BAND_FIELDS = {"low_th", "up_th", *(f"{SHORT_NAMES[m]}_{end}" for m in METRICS for end in ("low", "up"))}
WRITTEN = "url_written"  # the query string this session wrote last
PAGE = "url_page"  # the page of the previous run
PENDING = "url_settings"  # settings read from a link, applied once the run is open
PENDING_BRUSH = "url_brush"  # a brush read from a link (None: none), applied once the run is open
# The Samples page's filters and sort: URL name -> widget key (lists joined by ","; the sort a name).
SAMPLES_VIEW = {"verdict": "samples_verdict", "why": "samples_reason", "flags": "samples_flags", "sort": "samples_sort"}
SAMPLES_DEFAULTS = {"verdict": ",".join(VERDICTS), "sort": "pick rank"}  # left out of the URL
VIEW = ("id", "search", *SAMPLES_VIEW, "logx", "brush", "brush_label", "experiment", "item")  # what the URL holds besides the run and the selection
EXPERIMENT, ITEM = "outcomes_experiment", "outcomes_item"  # the Outcomes page's experiment and opened item


def default_selection() -> SelectConfig:
    """SelectConfig's defaults with the quality threshold of the filter stage: the app applies it
    whenever the run has ratings (`common.selection_config`)."""
    return dataclasses.replace(SelectConfig(), quality_threshold=FilterConfig().quality_threshold)


def keep_state() -> None:
    """At the start of every run (app.py): the widget keys that must survive a page switch."""
    for key in PERSISTENT:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


# ---------------------------------------------------------------------------------- the selection


def selection() -> SelectConfig:
    """The current selection as the session holds it (the threshold set even for a run without ratings)."""
    return st.session_state.setdefault(SELECTION, default_selection())


def set_selection(config: SelectConfig) -> None:
    """Make `config` the current selection (a link, a preset, a run's own settings); a config
    without a quality threshold keeps the current one. Its bands take the one shape a slider's
    change gives them (`with_bands`), so the URL and Export spell a selection one way."""
    if config.quality_threshold is None:
        config = dataclasses.replace(config, quality_threshold=selection().quality_threshold)
    st.session_state[SELECTION] = with_bands(config, {})


def change(**settings: Any) -> None:
    """Change some settings of the current selection: SelectConfig fields, or `band_<metric>`."""
    st.session_state[SELECTION] = changed(selection(), **settings)


def changed(config: SelectConfig, **settings: Any) -> SelectConfig:
    """`config` with some settings replaced: SelectConfig fields, or `band_<metric>` (a pair)."""
    bands = {name.removeprefix("band_"): value for name, value in settings.items() if name.startswith("band_")}
    if bands:
        config = with_bands(config, bands)
    rest = {name: value for name, value in settings.items() if not name.startswith("band_")}
    return dataclasses.replace(config, **rest)


def with_bands(config: SelectConfig, bands: dict[str, tuple[float, float]]) -> SelectConfig:
    """`config` with some metrics' bands replaced (one shared pair when they all agree)."""
    rest = {name: getattr(config, name) for name in FIELDS if name not in BAND_FIELDS}
    merged = config.bands() | {metric: (float(band[0]), float(band[1])) for metric, band in bands.items()}
    return SelectConfig.from_bands(merged, **rest)


def setting(name: str, config: SelectConfig | None = None) -> Any:
    """One setting of the current selection (or `config`): a field, or `band_<metric>` (a pair)."""
    config = config or selection()
    if name.startswith("band_"):
        return config.bands()[name.removeprefix("band_")]
    return getattr(config, name)


def from_run_settings(found: dict) -> SelectConfig:
    """The selection a run's own settings make (`threeds.rundir.read.run_settings`), the rest default."""
    found = dict(found)
    config = default_selection()
    bands = found.pop("bands", {})
    if "exclude_flags" in found:
        found["exclude_flags"] = tuple(found["exclude_flags"])
    config = dataclasses.replace(config, **found)
    return with_bands(config, bands) if bands else config


# ---------------------------------------------------------------------------------- widgets


def widget_key(name: str) -> str:
    """The key of the widget that shows setting `name` (never the setting itself)."""
    return f"w_{name}"


def bind(name: str, shown: Any = None) -> dict:
    """Keyword arguments that make a widget show setting `name` (or `shown`, a value the widget's
    range allows) and write the user's changes back to the selection."""
    value = setting(name) if shown is None else shown
    st.session_state[widget_key(name)] = list(value) if name == "exclude_flags" else value
    return {"key": widget_key(name), "on_change": _commit, "args": (name,)}


def _commit(name: str) -> None:
    value = st.session_state[widget_key(name)]
    kind = type(FIELDS[name].default) if name in FIELDS else None
    change(**{name: tuple(value) if isinstance(value, list | tuple) else kind(value) if kind in (int, float) else value})


# ---------------------------------------------------------------------------------- brush and rules


def set_brush(rows: np.ndarray, label: str) -> None:
    """Rows chosen on a map or histogram: they filter the Samples table and are drawn in colour."""
    st.session_state["brush_rows"] = np.unique(np.asarray(rows, dtype=np.int64))
    st.session_state["brush_label"] = label


def clear_brush() -> None:
    st.session_state.pop("brush_rows", None)
    st.session_state.pop("brush_label", None)


def brushed_rows() -> np.ndarray | None:
    return st.session_state.get("brush_rows")


def brushed_mask(n: int) -> np.ndarray:
    """True for brushed rows; every row when nothing is brushed."""
    rows = brushed_rows()
    if rows is None:
        return np.ones(n, dtype=bool)
    mask = np.zeros(n, dtype=bool)
    mask[rows[rows < n]] = True
    return mask


def add_rule(kind: str, ids: list[str]) -> None:
    """Put `ids` in the include or exclude rule (and out of the other one); the selection follows."""
    other = "exclude" if kind == "include" else "include"
    new = set(ids)
    config = selection()
    change(**{kind: tuple(dict.fromkeys([*getattr(config, kind), *ids])), other: tuple(i for i in getattr(config, other) if i not in new)})


def clear_rules() -> None:
    change(include=(), exclude=())


# ---------------------------------------------------------------------------------- the URL


def encode(run_name: str | None, config: SelectConfig | None, view: dict[str, str] | None = None) -> dict[str, str]:
    """The query string: the run, the selection's settings that differ from SelectConfig's defaults,
    and the view (`VIEW`: the inspector's id, the Samples search, the brush), each when set."""
    params = {"run": run_name} if run_name else {}
    if config is not None:
        for name, f in FIELDS.items():
            value = getattr(config, name)
            if value != f.default and value is not None:
                params[name] = format_value(value)
    return params | {name: value for name, value in (view or {}).items() if name in VIEW and value}


def view(page_path: str, inspector_path: str) -> dict[str, str]:
    """The view's URL part for the page shown: the sample id on the inspector, the search on Samples,
    the experiment and its opened item on Outcomes, the brush (rows of the run) on every page."""
    rows = brushed_rows()
    found = {"brush": encode_rows(rows), "brush_label": st.session_state.get("brush_label", "")} if rows is not None else {}
    if page_path == inspector_path:
        found["id"] = st.session_state.get("inspect_id") or ""
    if page_path == "samples":
        found["search"] = st.session_state.get("samples_query") or ""
        for name, key in SAMPLES_VIEW.items():
            value = st.session_state.get(key)
            text = ",".join(value) if isinstance(value, list) else value or ""
            found[name] = "" if text == SAMPLES_DEFAULTS.get(name) else text
    if page_path == "difficulty" and st.session_state.get("ins_ppl_log"):
        found["logx"] = "1"
    if page_path == "outcomes":
        found.update(experiment=st.session_state.get(EXPERIMENT) or "", item=st.session_state.get(ITEM) or "")
    return found


def encode_rows(rows: np.ndarray) -> str:
    """Row numbers as a short URL-safe text: a bit per row up to the last, deflated, base64."""
    mask = np.zeros(int(rows.max()) + 1 if len(rows) else 0, dtype=bool)
    mask[rows] = True
    return base64.urlsafe_b64encode(zlib.compress(np.packbits(mask).tobytes(), 9)).decode("ascii").rstrip("=")


MAX_BRUSH_ROWS = 2**22  # 4.2M rows, past the paper's 1.9M: 512 KiB unpacked, 32 MiB of row numbers at most


def decode_rows(text: str, max_rows: int = MAX_BRUSH_ROWS) -> np.ndarray:
    """The rows `encode_rows` wrote; SelectionError when the text is not one of its outputs or names a
    row past `max_rows`. Inflated with a bound: deflate packs 1,000 to 1, so an 11 KB link would
    otherwise unpack to gigabytes of row numbers."""
    limit = max_rows // 8 + 1
    bad = SelectionError(f"link setting brush={text[:20]!r} is not a brush this app wrote")
    if len(text) > 2 * limit:  # base64 of a deflated mask is never longer
        raise bad
    try:
        inflate = zlib.decompressobj()
        packed = inflate.decompress(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), limit)
    except (binascii.Error, zlib.error, ValueError):
        raise bad from None
    if inflate.unconsumed_tail or len(packed) == limit:
        raise SelectionError(f"link setting brush={text[:20]!r} names rows past {max_rows:,}, more than any run here holds")
    if not inflate.eof:  # cut short
        raise bad
    return np.flatnonzero(np.unpackbits(np.frombuffer(packed, dtype=np.uint8))).astype(np.int64)


def decode(params: dict[str, str]) -> SelectConfig:
    """The SelectConfig a query string names (absent fields: the defaults; other parameters, the view's,
    ignored); SettingsError naming a bad one."""
    return SelectConfig.from_dict({name: text for name, text in params.items() if name in FIELDS}, "link")


def history_navigation() -> bool:
    """Whether the browser's back/forward started this run (then the URL is the state to show).
    Outside a script run (no context) it did not; a Streamlit without the flag fails here, loudly."""
    ctx = get_script_run_ctx()
    return ctx is not None and bool(ctx.is_history_navigation)


def read_url(run_names: list[str], page_path: str) -> None:
    """On a session's first run, a page change or back/forward, take run, settings and id from
    the URL (before the run picker). A history entry's URL was written by `write_url`, so a setting
    it lacks is at its default; a pasted link's missing settings are the run's own."""
    back = history_navigation()
    if st.session_state.get(PAGE) == page_path and not back:
        return
    st.session_state[PAGE] = page_path
    params = st.query_params.to_dict()
    if not params or params == st.session_state.get(WRITTEN):
        return
    name = params.get("run")
    if name in run_names:
        st.session_state["next_run"] = name
        st.session_state["settings_of"] = None  # reopen: the link's settings go over the run's own
    elif name:
        st.sidebar.warning(f"The link names run {name!r}, which is not in this cache; showing another run.")
    if back or params.keys() & FIELDS.keys():
        try:
            st.session_state[PENDING] = decode(params)
        except SettingsError as exc:
            st.sidebar.warning(f"{exc}; the link's selection is ignored.")
    if params.get("id"):
        st.session_state["inspect_id"] = params["id"]
    if params.get("experiment"):
        st.session_state["outcomes_next"] = params["experiment"]  # the Outcomes page opens it once it lists it
    st.session_state[ITEM] = params.get("item") or None
    st.session_state["samples_query"] = params.get("search", "")
    for name, key in SAMPLES_VIEW.items():  # checked against the page's options when it draws them
        if name in params:
            st.session_state[key] = params[name] if name == "sort" else [v for v in params[name].split(",") if v]
        else:
            st.session_state.pop(key, None)
    st.session_state["ins_ppl_log"] = params.get("logx") == "1"
    read_brush(params)


def read_brush(params: dict[str, str]) -> None:
    """The link's brush (or none) for `pending_brush`, applied once its run is open."""
    try:
        rows = decode_rows(params["brush"]) if params.get("brush") else None
    except SelectionError as exc:
        st.sidebar.warning(f"{exc}; the link's brush is ignored.")
        rows = None
    st.session_state[PENDING_BRUSH] = None if rows is None else (rows, params.get("brush_label") or f"{len(rows):,} samples brushed (from a link)")


def pending() -> SelectConfig | None:
    """Settings a link brought, once (after the run picker has opened the link's run)."""
    return st.session_state.pop(PENDING, None)


def apply_pending_brush() -> None:
    """The brush a link brought (or its absence, after back/forward), once its run is open."""
    if PENDING_BRUSH in st.session_state:
        brush = st.session_state.pop(PENDING_BRUSH)
        if brush is None:
            clear_brush()
        else:
            set_brush(*brush)


def write_url(run_name: str | None, config: SelectConfig | None, view: dict[str, str]) -> None:
    """Put the current view in the query string (a new browser history entry when it changed)."""
    params = encode(run_name, config, view)
    if st.query_params.to_dict() != params:
        st.query_params.from_dict(params)
    st.session_state[WRITTEN] = params


# ---------------------------------------------------------------------------------- presets


def selection_config(has_ratings: bool) -> SelectConfig:
    """The selection every page shows and Export applies: the quality threshold applies when the
    run has ratings."""
    config = selection()
    return config if has_ratings else dataclasses.replace(config, quality_threshold=None)


def load_preset_named(run_dir: Path) -> None:
    """The preset picked in the sidebar becomes the selection (a button's callback)."""
    name = st.session_state.get("preset_pick")
    try:
        set_selection(load_preset(run_dir, name))
        st.session_state["preset_message"] = f"Loaded {name}; `threeds select --preset {name}` selects the same."
    except SelectionError as exc:
        st.session_state["preset_message"] = f"Not loaded: {exc}"


def save_preset_named(run_dir: Path, has_ratings: bool) -> None:
    """Save the current selection under the name typed in the sidebar (a button's callback)."""
    name = (st.session_state.get("preset_name") or "").strip()
    try:
        path = save_preset(run_dir, name, selection_config(has_ratings))
        st.session_state["preset_message"] = f"Saved {path}."
        st.session_state["preset_pick"] = name
    except SelectionError as exc:
        st.session_state["preset_message"] = f"Not saved: {exc}"
