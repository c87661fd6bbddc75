"""Where each rated record came from (its `source` field), for the Quality page's breakdown by source.

The scored records' sources are in data.jsonl: 4 GB at the paper's scale, so they are read once
(`RecordFile.codes`) and kept beside the run (`layout.SOURCES`: a code per row, and a description
with data.jsonl's size and mtime and the names the codes stand for); a later open reads 4 bytes per
row. The Stage-1-only records' sources come from the input file, where `Run.unscored_records` reads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from threeds.io.array_cache import read_cached, write_cached
from threeds.rundir import layout
from threeds.rundir.record_index import RecordFile

FIELD = "source"


def scored_sources(run_dir: Path, records: RecordFile) -> tuple[np.ndarray, list[str]]:
    """Per row of data.jsonl, an index into the list of source names ("" for none), cached."""
    array, description = (Path(run_dir) / name for name in layout.SOURCES)
    meta = {"data": records.stamp, "rows": len(records), "field": FIELD}
    try:
        names = json.loads(description.read_text(encoding="utf-8"))["names"]
    except (OSError, ValueError, KeyError, TypeError):
        names = None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        codes = read_cached(array, description, meta | {"names": names}, (len(records),))
        if codes is not None and codes.dtype == np.int32 and (codes.size == 0 or 0 <= codes.min() <= codes.max() < len(names)):
            return codes, names
    codes, names = records.codes(FIELD)
    write_cached(array, description, codes, meta | {"names": names})
    return codes, names


def rating_sources(rating_ids: pd.Series, rows: np.ndarray, scored: tuple[np.ndarray, list[str]],
                   unscored: Mapping[str, dict]) -> tuple[np.ndarray, list[str]] | None:  # fmt: skip
    """Per rating, an index into the returned names ("(none)" for a record without a source);
    `rows`: each rating's row of data.jsonl (-1: a Stage-1-only record, looked up in `unscored`).
    None when no rated record names a source (the page then has nothing to break down)."""
    codes, names = scored
    lookup = {name: code for code, name in enumerate(names)}
    out = np.where(rows >= 0, codes[np.maximum(rows, 0)] if len(codes) else 0, 0).astype(np.int64)
    names = list(names)
    for at in np.flatnonzero(rows < 0):  # the few Stage-1-only records
        name = str((unscored.get(rating_ids.iloc[at]) or {}).get(FIELD) or "")
        out[at] = lookup.setdefault(name, len(names))
        if out[at] == len(names):
            names.append(name)
    if not any(names[c] for c in np.unique(out)):
        return None
    return out, [n or "(none)" for n in names]
