"""Property-based tests (hypothesis): reading records, and `select` on random run directories."""

from __future__ import annotations

import csv
import json
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threeds.data import read_records, write_jsonl
from threeds.runcheck import RunFileError
from threeds.config import SelectConfig
from threeds.select import band_filter, selected_records
from threeds.selection import select_dir

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # any text a file can hold
visible = st.text(st.characters(whitelist_categories=("L", "N", "P")), min_size=1, max_size=8)
field = st.one_of(text, visible, st.none(), st.integers(-3, 3))
record = st.fixed_dictionaries(
    {"instruction": field, "output": field},
    optional={"id": st.one_of(st.text(max_size=4), st.integers(0, 5)), "input": st.one_of(text, st.none()), "extra": field},
)


def unusable(value) -> bool:
    """Not text, or nothing a reader would see: whitespace, control, format, unassigned characters."""
    invisible = {"Cc", "Cf", "Cs", "Cn", "Zs", "Zl", "Zp"}
    return not isinstance(value, str) or all(c.isspace() or unicodedata.category(c) in invisible or c in "\u115f\u1160\u3164\uffa0\u2800" for c in value)


@pytest.mark.filterwarnings("ignore:.*reuse an earlier id")
@SETTINGS
@given(st.lists(record, max_size=12))
def test_every_record_is_kept_or_rejected_once_in_file_order(rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        write_jsonl(path, rows)
        records, rejects = read_records(path, duplicate_ids="rename")
    assert len(records) + len(rejects) == len(rows)
    assert len({r["id"] for r in records}) == len(records)  # ids unique after renaming
    indices = [r["index"] for r in rejects]
    assert indices == sorted(set(indices)) and all(0 <= i < len(rows) for i in indices)
    kept_rows = [row for i, row in enumerate(rows) if i not in set(indices)]
    for rec, row in zip(records, kept_rows):  # records pass through unchanged, in file order
        assert rec["instruction"] == row["instruction"] and rec["output"] == row["output"]
        assert rec.get("extra", "absent") == row.get("extra", "absent")
        assert isinstance(rec["instruction"], str) and rec["instruction"].strip()
    for reject in rejects:
        bad = rows[reject["index"]]
        assert reject["field"] in {"instruction", "output", "input"}
        assert unusable(bad.get(reject["field"], None))
    for rec in records:
        assert not unusable(rec["instruction"]) and not unusable(rec["output"])


@SETTINGS
@given(st.lists(st.lists(visible, min_size=1, max_size=5), min_size=1, max_size=10))
def test_csv_rows_with_the_header_count_are_kept_and_others_rejected(cells):
    header = ["id", "instruction", "output"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i, row in enumerate(cells):
                writer.writerow([f"r{i}", *row])
        records, rejects = read_records(path)
    ok = [i for i, row in enumerate(cells) if len(row) == 2]
    assert [r["id"] for r in records] == [f"r{i}" for i in ok]
    assert [r["index"] for r in rejects] == [i for i in range(len(cells)) if i not in ok]
    assert all(f"{len(cells[r['index']]) + 1} cells, the header has 3" in r["reason"] for r in rejects)


def make_run_dir(path: Path, n: int, dim: int, seed: int, nan_share: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = [f"s{i}" for i in rng.permutation(n)]
    metrics = pd.DataFrame({"id": ids, **{c: rng.gamma(2.0, 1.0, n) for c in
                            ("ins_ppl", "gt_wloss_mean", "gt_wloss_max", "gen_wloss_mean", "gen_wloss_max")}})  # fmt: skip
    metrics.loc[rng.random(n) < nan_share, "gen_wloss_mean"] = np.nan
    metrics.to_parquet(path / "metrics.parquet", index=False)
    emb = rng.integers(-3, 4, (n, dim)).astype(np.float32)  # coarse values: ties and exact copies
    np.save(path / "embeddings.npy", emb)
    write_jsonl(path / "data.jsonl", [{"id": i, "instruction": f"q {i}", "output": "a", "row": r} for r, i in enumerate(ids)])
    return metrics


@SETTINGS
@given(
    n=st.integers(1, 60), dim=st.integers(1, 6), seed=st.integers(0, 10**6), k=st.integers(1, 70),
    low=st.floats(0, 100), width=st.floats(0, 100), nan_share=st.sampled_from([0.0, 0.2, 1.0]),
)
def test_select_picks_distinct_band_survivors_and_returns_their_own_records(n, dim, seed, k, low, width, nan_share):
    high = min(100.0, low + width)
    bands = {m: (low, high) for m in ("ins_ppl", "gen_wloss", "gt_wloss")}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        metrics = make_run_dir(run, n, dim, seed, nan_share)
        result = select_dir(run, SelectConfig(low_th=low, up_th=high, sample_num=k, seed=seed % 7))
        records = selected_records(run, result["selected_ids"])
        assert json.loads((run / "selection.json").read_text()) == result
    keep, _ = band_filter(metrics, bands)
    rows = result["selected_rows"]
    assert len(rows) == len(set(rows)) == min(k, int(keep.sum()))
    assert all(keep[r] for r in rows)
    assert [metrics["id"][r] for r in rows] == result["selected_ids"]
    assert [rec["row"] for rec in records] == rows  # each id brings back its own record


@SETTINGS
@given(n=st.integers(2, 30), seed=st.integers(0, 10**6), data=st.data())
def test_select_refuses_a_run_with_a_repeated_or_misplaced_id(n, seed, data):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        metrics = make_run_dir(run, n, 3, seed, 0.0)
        a, b = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
        where = data.draw(st.sampled_from(["metrics.parquet", "data.jsonl"]))
        if where == "metrics.parquet":
            metrics.loc[b, "id"] = metrics.loc[a, "id"]
            metrics.to_parquet(run / "metrics.parquet", index=False)
        else:
            lines = (run / "data.jsonl").read_text().splitlines()
            lines[a], lines[b] = lines[b], lines[a]
            (run / "data.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(RunFileError, match=where):
            select_dir(run, SelectConfig(sample_num=3))
        assert not (run / "selection.json").exists()
