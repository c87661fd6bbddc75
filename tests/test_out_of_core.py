"""Runs read without holding them in memory (issue 30 item 2): data.jsonl through its row index,
embeddings memory-mapped in their dtype on disk (float16 accepted), and the paper-shape generator
(bench/make_scale_run.py) on a small shape."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_run import make_run

from threeds.config import SelectConfig
from threeds.rundir import layout, record_index
from threeds.rundir.check import RunFileError, selected_records
from threeds.rundir.read import load_run
from threeds.rundir.record_index import RecordFile, open_records
from threeds.selection.apply import select_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from make_scale_run import make_scale_run  # noqa: E402


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / layout.DATA).read_text(encoding="utf-8").splitlines()]


def test_records_are_read_by_row_through_the_offset_index(tmp_path, monkeypatch):
    run = make_run(tmp_path / "r", n=30, n_dropped=0)
    loaded = load_run(run)
    assert isinstance(loaded.records, RecordFile) and len(loaded.records) == 30
    written = _lines(run)
    assert loaded.records[7] == written[7] and loaded.records[-1] == written[29]
    assert loaded.records.take([12, 3, 12]) == [written[12], written[3], written[12]]  # asked order, repeats kept
    assert list(loaded.records) == written and [r for chunk in loaded.records.chunks(7) for r in chunk] == written
    offsets = np.load(run / layout.DATA_INDEX[0])
    raw = (run / layout.DATA).read_bytes()
    assert json.loads(raw[offsets[7] : offsets[8]]) == written[7] and offsets[-1] == len(raw)
    with pytest.raises(IndexError):
        loaded.records[30]
    monkeypatch.setattr(record_index, "index_lines", lambda *a: pytest.fail("the kept index should be reused"))
    assert load_run(run).records[5] == written[5]


def test_the_index_is_remade_when_data_changes_and_bad_lines_are_named(tmp_path):
    run = make_run(tmp_path / "r", n=10, n_dropped=0)
    ids = [f"s{i:06d}" for i in range(10)]
    open_records(run / layout.DATA, ids, run)
    records = _lines(run)
    records[3]["output"] = "A much longer answer than before, so every later line moves."
    (run / layout.DATA).write_text("".join(json.dumps(r) + "\n" for r in records))
    again = open_records(run / layout.DATA, ids, run)
    assert again[3]["output"].startswith("A much longer") and again[9] == records[9]
    lines = (run / layout.DATA).read_text().splitlines()
    (run / layout.DATA).write_text("\n".join(lines[:4] + ["{not json"] + lines[5:]) + "\n")
    with pytest.raises(RunFileError, match=r"data.jsonl: invalid JSON on line 5"):
        open_records(run / layout.DATA, ids, run)
    (run / layout.DATA).write_text("\n".join(lines[:2] + [lines[3], lines[2]] + lines[4:]) + "\n")
    with pytest.raises(RunFileError, match=r"do not match metrics.parquet row for row .*first difference at row 2"):
        open_records(run / layout.DATA, ids, run)


def test_selected_records_reads_only_the_picks_in_pick_order(tmp_path):
    run = make_run(tmp_path / "r", n=20, n_dropped=0)
    written = _lines(run)
    assert selected_records(run, ["s000017", "s000002"]) == [written[17], written[2]]
    with pytest.raises(RunFileError, match=r"data.jsonl: 1 selected ids not in it"):
        selected_records(run, ["s000001", "nope"])


def _as_float16(run: Path) -> np.ndarray:
    emb = np.load(run / layout.EMBEDDINGS)
    np.save(run / layout.EMBEDDINGS, emb.astype(np.float16))
    return emb


def test_float16_embeddings_stay_mapped_and_pick_like_float32(tmp_path):
    runs = {dtype: make_run(tmp_path / dtype, n=400, n_dropped=0, dim=32, tokens=False) for dtype in ("float32", "float16")}
    _as_float16(runs["float16"])
    loaded = load_run(runs["float16"])
    assert loaded.errors == {} and loaded.embeddings.dtype == np.float16 and isinstance(loaded.embeddings, np.memmap)
    config = SelectConfig(quality_threshold=None, sample_num=40, seed=3)
    picks = {dtype: select_dir(run, config)["selected_ids"] for dtype, run in runs.items()}
    assert len(picks["float16"]) == 40
    assert len(set(picks["float16"]) & set(picks["float32"])) >= 36  # rounding to half moves at most a few near-ties


def test_loading_a_float16_run_makes_no_float32_copy_of_the_embeddings(tmp_path):
    run = make_run(tmp_path / "r", n=3000, n_dropped=0, dim=2048, tokens=False)
    emb = _as_float16(run)
    tracemalloc.start()
    try:
        loaded = load_run(run)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(loaded.embeddings[5], emb[5].astype(np.float16))
    assert peak < emb.nbytes / 4, f"peak {peak:,} B while loading; a float32 copy is {emb.nbytes:,} B, a float16 one half that"


def test_make_scale_run_writes_a_run_threeds_reads(tmp_path):
    run = make_scale_run(tmp_path / "s", n=4000, dim=24, dtype="float16", seed=1, chunk=1500, token_rows=5)
    assert len(np.load(run / layout.DATA_INDEX[0])) == 4001  # left as Stage 2 leaves it, with the sources and A' checks
    assert all((run / name).is_file() for name in (*layout.SOURCES, *layout.REPEAT_SHARES))
    loaded = load_run(run)
    assert loaded.errors == {} and loaded.embeddings.shape == (4000, 24) and loaded.embeddings.dtype == np.float16
    assert len(loaded.ratings) == 4200 and (loaded.ratings["score"].to_numpy()[:4000] >= 85).all()
    assert loaded.records[3999]["id"] == loaded.metrics["id"].iloc[3999] == "s0003999"
    assert len({r["source"] for r in loaded.records}) == 5
    assert set(pd.read_parquet(run / layout.TOKENS)["id"]) == {f"s{i:07d}" for i in range(5)}
    result = select_dir(run, SelectConfig(quality_threshold=85.0, sample_num=50))
    assert 0.10 < result["report"]["n_kept"] / 4000 < 0.15  # the paper's 25-75 bands on three independent metrics: 12.5%
    again = make_scale_run(tmp_path / "t", n=4000, dim=24, dtype="float16", seed=1, chunk=1500, token_rows=5)
    assert (again / layout.EMBEDDINGS).read_bytes() == (run / layout.EMBEDDINGS).read_bytes()  # seeded


def test_text_search_reads_records_by_chunk_and_matches_case_insensitively(tmp_path):
    run = make_run(tmp_path / "r", n=40, n_dropped=0)
    records = load_run(run).records
    written = _lines(run)
    written[5]["output"] = "Ünïcode ANSWER with \"quotes\" and a back\\slash"
    written[9]["generated_output"] = "ünïcode answer"
    (run / layout.DATA).write_text("".join(json.dumps(r) + "\n" for r in written))  # json.dumps escapes non-ASCII
    records = load_run(run).records
    text = lambda r: f"{r['instruction']}\n{r['output']}\n{r['generated_output']}"  # noqa: E731
    for needle in ("ASTHMA", "case 3?", "ünïcode", 'with "quotes"', "back\\slash", "s000001", "instruction"):
        want = [i for i, r in enumerate(written) if needle.lower() in text(r).lower()]
        assert records.matching(needle, text, size=7).tolist() == want, needle  # chunks of 7 rows
    assert records.matching("asthma", text, limit=2).tolist() == [i for i, r in enumerate(written) if "asthma" in r["instruction"]][:2]


def test_stage2_writes_float16_embeddings_chunk_by_chunk(tmp_path):
    from threeds.config import ModelConfig, ScoreConfig
    from threeds.rundir.write import RunDir

    rng = np.random.default_rng(0)
    emb = rng.normal(0, 3, (7, 5)).astype(np.float32)
    metrics = pd.DataFrame({"id": [f"s{i}" for i in range(7)], "ins_ppl": rng.random(7)})
    run = RunDir(tmp_path / "r")
    for index, (a, b) in enumerate(((0, 3), (3, 4), (4, 7))):
        run.write_chunk(index, metrics.iloc[a:b], emb[a:b], pd.DataFrame({"id": metrics["id"].iloc[a:b]}))
    run.consolidate(3, [{"id": f"s{i}", "instruction": "q", "output": "a"} for i in range(7)], "float16")
    written = np.load(tmp_path / "r" / layout.EMBEDDINGS)
    assert written.dtype == np.float16 and np.array_equal(written, emb.astype(np.float16))
    assert "embeddings_dtype" not in ScoreConfig().recorded(ModelConfig())  # float32 runs scored before the option still match
    assert ScoreConfig(embeddings_dtype="float16").recorded(ModelConfig())["embeddings_dtype"] == "float16"


def test_stage2_leaves_the_row_index_and_sources_so_the_first_open_parses_no_record(tmp_path, monkeypatch):
    from threeds.rundir import record_index
    from threeds.rundir.check import read_scored_records
    from threeds.rundir.sources import scored_sources
    from threeds.rundir.write import RunDir

    records = [{"id": f"s{i}", "instruction": "q" * (i + 1), "output": "ä", **({"source": "pubmed" if i % 2 else 7} if i < 4 else {})}
               for i in range(5)]  # fmt: skip
    metrics = pd.DataFrame({"id": [r["id"] for r in records], "ins_ppl": np.arange(5.0)})
    run = RunDir(tmp_path / "r")
    run.write_chunk(0, metrics, np.zeros((5, 2), np.float32), pd.DataFrame({"id": metrics["id"]}))
    run.consolidate(1, records)
    lines = (tmp_path / "r" / layout.DATA).read_bytes().splitlines(keepends=True)
    starts = np.cumsum([0] + [len(line) for line in lines])
    assert np.load(tmp_path / "r" / layout.DATA_INDEX[0]).tolist() == starts.tolist()  # bytes by hand

    def parse(*_):
        raise AssertionError("data.jsonl parsed again")

    monkeypatch.setattr(record_index, "index_lines", parse)
    assert read_scored_records(tmp_path / "r", list(metrics["id"])).take([4, 0]) == [records[4], records[0]]
    monkeypatch.setattr(RecordFile, "codes", parse)
    codes, names = scored_sources(tmp_path / "r", read_scored_records(tmp_path / "r", list(metrics["id"])))
    assert [names[c] for c in codes] == ["7", "pubmed", "7", "pubmed", ""]  # as RecordFile.codes reads them


def test_ratings_are_read_as_columns_with_the_line_reader_as_fallback(tmp_path):
    from threeds.rundir.read import read_ratings

    rows = [{"id": "a", "score": 90.0, "raw": "90"}, {"id": "b", "score": None, "error": "no number"}, {"id": "a", "score": 70.5, "raw": "70.5"}]
    path = tmp_path / "ratings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columnar = read_ratings(path)
    assert list(columnar.columns) == ["id", "score"] and columnar["id"].tolist() == ["b", "a"]
    assert np.isnan(columnar["score"].iloc[0]) and columnar["score"].iloc[1] == 70.5  # the last row per id
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"id": 7, "score": "80"}]) + '{"id": "torn')  # mixed types, a torn line
    with pytest.warns(UserWarning, match="truncated last line"):
        mixed = read_ratings(path)
    assert mixed["id"].tolist() == ["b", "a", "7"] and mixed["score"].iloc[2] == 80.0


@pytest.mark.parametrize("rows, ids, scores", [
    ([{"id": "a", "score": 90, "raw": "90", "seconds": 0.1}, {"id": "b", "score": 70.5}], ["a", "b"], [90.0, 70.5]),  # typed: other fields skipped
    ([{"id": 1, "score": 90}, {"id": 2, "score": 80}], ["1", "2"], [90.0, 80.0]),  # ids as numbers: types inferred
    ([{"id": "a", "score": None, "error": "x"}, {"id": "b", "score": None}], ["a", "b"], [np.nan, np.nan]),  # never a score
])  # fmt: skip
def test_ratings_read_with_their_types_given_or_inferred_alike(tmp_path, rows, ids, scores):
    from threeds.rundir.read import read_ratings

    path = tmp_path / "ratings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    frame = read_ratings(path)
    assert frame["id"].tolist() == ids and np.array_equal(frame["score"].to_numpy(), scores, equal_nan=True)
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "score"}) + "\n" for r in rows))
    with pytest.raises(RunFileError, match=r"rows lack \['score'\]"):
        read_ratings(path)


def test_has_repeats_counts_distinct_values():
    from threeds.rundir.check import has_repeats

    assert not has_repeats(pd.Series(["a", "b", "c"])) and has_repeats(pd.Series(["a", "b", "a"]))
    assert not has_repeats(pd.Series([], dtype=str))


def test_float16_rows_are_used_as_they_are_and_pick_exactly_as_their_float32_copy():
    from threeds.selection.arrays import NumpyOps
    from threeds.selection.kcenter import k_center_greedy

    rng = np.random.default_rng(4)
    x16 = (rng.normal(0, 3, (500, 12)) + 20).astype(np.float16)
    x16[400:450] = x16[:50]  # exact copies: found by hashing, never picked before their first
    assert NumpyOps("float32").shared(x16) is x16  # no float32 copy of the candidates
    assert NumpyOps("float16").shared(x16) is None  # half storage centres the rows: a copy
    picks = k_center_greedy(x16, 470, seed=5, device="cpu")
    assert picks.tolist() == k_center_greedy(x16.astype(np.float32), 470, seed=5, device="cpu").tolist()
    assert not set(picks[:450].tolist()) & set(range(400, 450))


def test_a_field_of_every_record_as_codes_read_by_arrow_or_line_by_line(tmp_path):
    """`RecordFile.codes` gives each row its value's position in the returned names ("" for a
    record without the field, null or empty); a value Arrow cannot read as a string (a number)
    sends the file through the line reader, with the same answer."""
    rows = [{"id": f"i{i}", "instruction": "q", "source": ["pubmed", "wiki", None, ""][i % 4]} for i in range(10)]
    del rows[5]["source"]
    path = tmp_path / layout.DATA
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [r["id"] for r in rows]
    codes, names = open_records(path, ids, tmp_path).codes("source")
    assert [names[c] for c in codes] == ["pubmed", "wiki", "", "", "pubmed", "", "", "", "pubmed", "wiki"]
    rows[3]["source"] = 7  # not a string: Arrow refuses the column
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    codes, names = open_records(path, ids, tmp_path).codes("source")
    assert [names[c] for c in codes] == ["pubmed", "wiki", "", "7", "pubmed", "", "", "", "pubmed", "wiki"]


def test_the_scored_records_sources_are_read_once_and_kept_beside_the_run(tmp_path, monkeypatch):
    """The first call reads data.jsonl; a later one reads layout.SOURCES, not a record; a changed
    data.jsonl (its stamp) or a corrupt cache is read again."""
    from threeds.rundir.sources import scored_sources

    run = make_run(tmp_path / "r", n=12, n_dropped=0)
    records = load_run(run).records
    codes, names = scored_sources(run, records)
    assert [names[c] for c in codes] == [r["source"] for r in _lines(run)]
    assert all((run / name).is_file() for name in layout.SOURCES)

    def no_reading(*args, **kwargs):
        raise AssertionError("data.jsonl read again")

    with monkeypatch.context() as m:
        m.setattr(RecordFile, "codes", no_reading)
        again = scored_sources(run, load_run(run).records)
    assert (again[0] == codes).all() and again[1] == names
    lines = _lines(run)
    lines[0]["source"] = "a source of its own"
    (run / layout.DATA).write_text("".join(json.dumps(r) + "\n" for r in lines))
    codes, names = scored_sources(run, load_run(run).records)
    assert names[codes[0]] == "a source of its own" and [names[c] for c in codes[1:]] == [r["source"] for r in lines[1:]]
    (run / layout.SOURCES[0]).write_bytes(b"not a npy file")
    assert [names[c] for c in scored_sources(run, load_run(run).records)[0]] == [r["source"] for r in lines]


def test_each_ratings_source_comes_from_its_scored_record_or_the_input_file():
    """Rows -1 (Stage-1-only records) are looked up in the input file's records; None when no
    rated record names a source."""
    from threeds.views.sources import rating_sources

    ids = pd.Series(["a", "b", "c", "d"])
    scored = (np.array([1, 0], dtype=np.int32), ["", "pubmed"])
    codes, names = rating_sources(ids, np.array([1, -1, 0, -1]), scored, {"b": {"source": "forum"}, "d": {}})
    assert [names[c] for c in codes] == ["(none)", "forum", "pubmed", "(none)"]
    assert rating_sources(ids, np.array([1, -1, 1, -1]), scored, {}) is None
