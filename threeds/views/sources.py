"""Where each rated record came from (its `source` field), for the Quality page's breakdown by source:
the scored records' from the codes kept beside the run (`threeds.rundir.sources`), the Stage-1-only
records' from the input file, where `Run.unscored_records` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from threeds.rundir.sources import FIELD


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
