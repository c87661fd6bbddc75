"""threeds app: explore a 3DS run's difficulty, tune the bands, inspect attention, export.

`streamlit run app.py` (binds 127.0.0.1, see .streamlit/config.toml). This file runs first on
every page: page config, shared state, the run picker and the navigation. The pages are in
app_pages/ (not `pages/`: Streamlit treats a `pages/` directory as the older file-per-page
navigation and, on a server's first request for a page URL, would run that file without this one).
"""

from __future__ import annotations

import streamlit as st

from app_pages import common

common.page_config()
navigation = st.navigation(
    [
        st.Page("app_pages/runs.py", title="Runs", icon=":material/folder_open:", default=True),
        st.Page("app_pages/quality.py", title="Quality", icon=":material/star:"),
        st.Page("app_pages/difficulty.py", title="Difficulty", icon=":material/bar_chart:"),
        st.Page("app_pages/samples.py", title="Samples", icon=":material/table_rows:"),
        st.Page(common.INSPECTOR, title="Sample inspector", icon=":material/search:"),
        st.Page("app_pages/embedding_map.py", title="Embedding map", icon=":material/scatter_plot:"),
        st.Page("app_pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
        st.Page("app_pages/export.py", title="Export", icon=":material/download:"),
        st.Page("app_pages/outcomes.py", title="Outcomes", icon=":material/science:"),
    ]
)
common.setup(navigation.url_path)
with common.whole_run(navigation.url_path):  # then the URL, also after st.stop()
    navigation.run()
