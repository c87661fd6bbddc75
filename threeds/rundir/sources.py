"""Where each scored record came from (its `source` field), kept beside the run for the Quality
page's breakdown by source.

data.jsonl is 4 GB at the paper's scale, so the codes are made while the records are at hand:
Stage 2 writes them as it writes data.jsonl (`RunDir.consolidate`, beside the row index), and a
reader of a run scored before makes them once (`RecordFile.codes`). `layout.SOURCES`: a code per row
(int32 .npy) and a description with data.jsonl's size and mtime and the names the codes stand
for; a later open reads 4 bytes per row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from threeds.io.array_cache import read_cached, write_cached
from threeds.rundir import layout
from threeds.rundir.record_index import RecordFile, codes_of

FIELD = "source"


def scored_sources(run_dir: Path, records: RecordFile) -> tuple[np.ndarray, list[str]]:
    """Per row of data.jsonl, an index into the list of source names ("" for none): the kept
    codes while they describe this data.jsonl, else read from it once and kept."""
    found = kept_sources(run_dir, records)
    if found is None:
        found = records.codes(FIELD)
        keep_sources(run_dir, records, *found)
    return found


def kept_sources(run_dir: Path, records: RecordFile) -> tuple[np.ndarray, list[str]] | None:
    """The kept codes and names, or None when missing, made from another data.jsonl, or corrupt."""
    array, description = (Path(run_dir) / name for name in layout.SOURCES)
    try:
        names = json.loads(description.read_text(encoding="utf-8"))["names"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return None
    codes = read_cached(array, description, _meta(records) | {"names": names}, (len(records),))
    if codes is None or codes.dtype != np.int32 or (codes.size and not 0 <= codes.min() <= codes.max() < len(names)):
        return None
    return codes, names


def keep_sources(run_dir: Path, records: RecordFile, codes: np.ndarray, names: list[str]) -> None:
    """Keep `records`' codes beside the run (an unwritable directory costs a reading next time)."""
    array, description = (Path(run_dir) / name for name in layout.SOURCES)
    write_cached(array, description, codes, _meta(records) | {"names": names})


def source_codes(records: Iterable[dict]) -> tuple[np.ndarray, list[str]]:
    """The codes of records at hand (Stage 2's, as it writes data.jsonl), as `RecordFile.codes` reads them."""
    return codes_of(r.get(FIELD) for r in records)


def _meta(records: RecordFile) -> dict:
    return {"data": records.stamp, "rows": len(records), "field": FIELD}
