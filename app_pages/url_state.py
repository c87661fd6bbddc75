"""The view in the URL: the run, every selection setting and, on the inspector, the sample id.

After each run of the app the query string is rewritten from the session (`write`); Streamlit's
frontend pushes a browser history entry for each new query string (`history.pushState`), so every
committed change is a step back/forward can return to. The URL is read into the session (`read`)
on the first run of a session (a reload, a pasted link, a bookmark), when the page changes, and
on back/forward within a page: on the browser's `popstate` Streamlit reruns the script with the
restored query string and marks the run as a history navigation (`is_history_navigation` of the
script run context, Streamlit >= 1.50). Not otherwise: while a slider is dragged the browser
sends reruns that still carry the previous query string, and reading those would move it back.
Selection settings use SelectConfig's field names and only appear when they differ from its
defaults, so `?run=demo&quality_threshold=90&conf_up=80` is a complete link.
"""

from __future__ import annotations

import dataclasses

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from threeds.config import SelectConfig, format_value
from threeds.selection.apply import SelectionError, check

FIELDS = {f.name: f for f in dataclasses.fields(SelectConfig)}
WRITTEN = "url_written"  # the query string this session wrote last
PAGE = "url_page"  # the page of the previous run
PENDING = "url_settings"  # settings read from a link, applied once the run is open


def encode(run_name: str | None, config: SelectConfig | None, sample_id: str | None = None) -> dict[str, str]:
    params = {"run": run_name} if run_name else {}
    if config is not None:
        for name, f in FIELDS.items():
            value = getattr(config, name)
            if value != f.default and value is not None:
                params[name] = format_value(value)
    if sample_id:
        params["id"] = sample_id
    return params


def decode(params: dict[str, str]) -> SelectConfig:
    """The SelectConfig a query string names (absent fields: the defaults); SelectionError if bad."""
    values = {}
    for name, text in params.items():
        if name not in FIELDS:
            continue
        try:
            values[name] = FIELDS[name].metadata["kind"](text)
        except ValueError:
            raise SelectionError(f"link setting {name}={text!r} is not a valid {FIELDS[name].metadata['kind'].__name__}") from None
    config = SelectConfig(**values)
    check(config)
    return config


def history_navigation() -> bool:
    """Whether the browser's back/forward started this run (then the URL is the state to show)."""
    ctx = get_script_run_ctx()
    return bool(getattr(ctx, "is_history_navigation", False))


def read(run_names: list[str], page_path: str) -> None:
    """On a session's first run, a page change or back/forward, take run, settings and id from
    the URL (before the run picker). A history entry's URL was written by `write`, so a setting
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
        except SelectionError as exc:
            st.sidebar.warning(f"{exc}; the link's selection is ignored.")
    if params.get("id"):
        st.session_state["inspect_id"] = params["id"]


def pending() -> SelectConfig | None:
    """Settings a link brought, once (after the run picker has opened the link's run)."""
    return st.session_state.pop(PENDING, None)


def write(run_name: str | None, config: SelectConfig | None, sample_id: str | None) -> None:
    params = encode(run_name, config, sample_id)
    if st.query_params.to_dict() != params:
        st.query_params.from_dict(params)
    st.session_state[WRITTEN] = params
