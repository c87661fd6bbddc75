"""Property-based tests (hypothesis): reading records, writing a scored run in chunks, and `select`
on random run directories; the run's files are read back from disk and the properties asserted on
what was read."""

from __future__ import annotations

import csv
import json
import tempfile
import unicodedata
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threeds.config import SelectConfig
from threeds.io.data import read_jsonl, read_records, write_jsonl
from threeds.names import METRIC_COLUMNS, TOKEN_COLUMNS
from threeds.rundir.check import RunFileError, load_scored, selected_records
from threeds.rundir.write import RunDir
from threeds.selection.apply import select_dir
from threeds.selection.kcenter import band_filter

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


def make_run_dir(path: Path, n: int, dim: int, seed: int, nan_share: float, chunks: int = 1) -> tuple[pd.DataFrame, np.ndarray]:
    """A scored run written as the pipeline writes one: `chunks` chunks (random sizes) through
    `RunDir.write_chunk`, `RunDir.consolidate`, the completion marker, the chunks removed; returns the metrics and embeddings written."""
    rng = np.random.default_rng(seed)
    ids = [f"s{i}" for i in rng.permutation(n)]
    metrics = pd.DataFrame({"id": ids, **{c: rng.gamma(2.0, 1.0, n) for c in METRIC_COLUMNS[1:]}})
    metrics.loc[rng.random(n) < nan_share, "gen_wloss_mean"] = np.nan
    emb = rng.integers(-3, 4, (n, dim)).astype(np.float32)  # coarse values: ties and exact copies
    tokens = pd.DataFrame({"id": ids, "response": "gen", "pos": 0, "token": "a", "start": 0, "end": 1, "loss": 1.0,
                           "w_mean": 0.5, "w_max": 0.5, "function_word": False})[TOKEN_COLUMNS]  # fmt: skip
    cuts = [0, *sorted(rng.choice(np.arange(1, n), min(chunks, n) - 1, replace=False).tolist()), n]
    run = RunDir(path)
    for index, (a, b) in enumerate(pairwise(cuts)):
        run.write_chunk(index, metrics.iloc[a:b], emb[a:b], tokens.iloc[a:b])
    run.consolidate(len(cuts) - 1, [{"id": i, "instruction": f"q {i}", "output": "a", "row": r} for r, i in enumerate(ids)])
    run.update_manifest(status="scored")  # the completion marker, then the chunks go (as the pipeline does)
    run.remove_chunks()
    return metrics, emb


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), dim=st.integers(1, 4), seed=st.integers(0, 10**6), chunks=st.integers(1, 6),
       nan_share=st.sampled_from([0.0, 0.3, 1.0]))  # fmt: skip
def test_a_run_written_in_chunks_reads_back_row_for_row(n, dim, seed, chunks, nan_share):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        metrics, emb = make_run_dir(run, n, dim, seed, nan_share, chunks)
        back = pd.read_parquet(run / "metrics.parquet")
        emb_back = np.load(run / "embeddings.npy", allow_pickle=False)
        token_ids = pd.read_parquet(run / "tokens.parquet")["id"].tolist()
        data_ids = [r["id"] for r in read_jsonl(run / "data.jsonl")]
        checked, _ = load_scored(run)  # the reader select and the app use accepts it
        assert not (run / "chunks").exists()
    assert list(back.columns) == METRIC_COLUMNS and len(back) == n
    assert back["id"].tolist() == metrics["id"].tolist() == data_ids == token_ids  # chunk order kept
    assert back["id"].is_unique
    for column in METRIC_COLUMNS[1:]:  # every value back bit for bit, NaN where one was written
        assert back[column].dtype == np.float64
        assert np.array_equal(back[column].to_numpy(), metrics[column].to_numpy(), equal_nan=True)
    assert back["gen_wloss_mean"].isna().sum() == metrics["gen_wloss_mean"].isna().sum()
    assert emb_back.dtype == np.float32 and np.array_equal(emb_back, emb)
    pd.testing.assert_frame_equal(checked, back)


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
        make_run_dir(run, n, dim, seed, nan_share, chunks=seed % 3 + 1)
        result = select_dir(run, SelectConfig(low_th=low, up_th=high, sample_num=k, seed=seed % 7))
        records = selected_records(run, result["selected_ids"])
        assert json.loads((run / "selection.json").read_text()) == result
        metrics = pd.read_parquet(run / "metrics.parquet")  # what select read, read back from disk
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
        make_run_dir(run, n, 3, seed, 0.0)
        metrics = pd.read_parquet(run / "metrics.parquet")
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
