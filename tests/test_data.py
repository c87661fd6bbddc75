"""Reading, normalising, rejecting and writing records, on real files in every format."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from threeds.io.data import (
    DataError,
    append_jsonl,
    fingerprint,
    full_instruction,
    read_jsonl,
    read_records,
    require_fields,
    to_alpaca,
    to_sharegpt,
    write_json,
    write_jsonl,
)

MEDQUAD = Path("/work/shared/data/medquad_en_3k.jsonl")

ROWS = [
    {"id": "a", "instruction": "What is flu?", "output": "A viral infection.", "source": "x"},
    {"instruction": "Dose?", "input": "Child, 20 kg", "output": "10 mg/kg.", "source": "y"},
    {"id": 7, "instruction": "头疼怎么办？", "output": "注意休息。", "source": "z"},
    {"instruction": "No input?", "output": "None.", "source": "w"},
]


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_every_format(tmp_path: Path, rows: list[dict]) -> list[Path]:
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows, ensure_ascii=False, indent=2), "utf-8")
    # Parquet: every row has every column (None where absent), and a column has one type.
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = [{k: r.get(k) for k in keys} | {"id": r.get("id") and str(r["id"])} for r in rows]
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(table), parquet)
    return [
        array,
        write_lines(tmp_path / "data.jsonl", rows),
        write_lines(tmp_path / "lines.json", rows),  # JSON Lines under a .json name
        write_lines(tmp_path / "data.ndjson", rows),
        parquet,
        write_csv(tmp_path / "data.csv", rows),
    ]


def test_every_format_reads_to_the_same_records(tmp_path):
    results = [read_records(p) for p in write_every_format(tmp_path, ROWS)]
    for records, rejects in results:
        assert rejects == []
        assert [r["id"] for r in records] == [r["id"] for r in results[0][0]]
        assert [r["instruction"] for r in records] == [r["instruction"] for r in ROWS]
        assert [r["output"] for r in records] == [r["output"] for r in ROWS]
        assert [r["source"] for r in records] == ["x", "y", "z", "w"]
    records = results[0][0]
    assert records[0]["id"] == "a"
    assert records[2]["id"] == "7"  # given ids are kept, as strings
    assert records[1]["id"].startswith("h-") and len(records[1]["id"]) == 18
    assert "input" not in records[0] and records[1]["input"] == "Child, 20 kg"
    assert list(records[1]) == ["id", "instruction", "input", "output", "source"]


def test_hash_ids_are_stable_and_made_unique(tmp_path):
    row = {"instruction": "Q?", "output": "A."}
    path = write_lines(tmp_path / "d.jsonl", [row, {"instruction": "Q2?", "output": "A."}, row])
    first, _ = read_records(path)
    again, _ = read_records(path)
    assert [r["id"] for r in first] == [r["id"] for r in again]
    assert first[2]["id"] == first[0]["id"] + "-2"
    assert len({r["id"] for r in first}) == 3
    # The hash depends on content only, not on the file or its position.
    moved, _ = read_records(write_lines(tmp_path / "e.jsonl", [{"x": 1, **row}]))
    assert moved[0]["id"] == first[0]["id"]


def test_hash_ids_never_collide_with_given_ids(tmp_path):
    row = {"instruction": "Q?", "output": "A."}
    hashed = read_records(write_lines(tmp_path / "a.jsonl", [row]))[0][0]["id"]
    records, _ = read_records(write_lines(tmp_path / "b.jsonl", [row, {**row, "id": hashed}]))
    assert records[1]["id"] == hashed and records[0]["id"] == hashed + "-2"


def test_duplicate_ids_name_both_lines(tmp_path):
    rows = [{"id": "x", "instruction": "Q", "output": "A"}] * 2
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", "utf-8")
    with pytest.raises(DataError, match=r"dup\.jsonl.*'x'.*line 1 and line 3"):
        read_records(path)


def test_duplicate_ids_name_both_indices(tmp_path):
    rows = [
        {"id": 1, "instruction": "Q", "output": "A"},
        ROWS[0],
        {"id": "1", "instruction": "R", "output": "B"},
    ]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(rows), "utf-8")
    with pytest.raises(DataError, match=r"'1'.*index 0 and index 2"):
        read_records(path)


@pytest.mark.parametrize("bad, kind", [({"a": 1}, "an object"), ([1], "a list"), (True, "true/false")])
def test_an_id_that_is_not_a_string_or_number_names_its_line(tmp_path, bad, kind):
    rows = [{"id": 3, "instruction": "Q", "output": "A"}, {"id": 2.5, "instruction": "Q", "output": "A"},
            {"id": bad, "instruction": "Q", "output": "A"}]  # fmt: skip
    with pytest.raises(DataError, match=rf"ids\.jsonl: line 3: field id: must be a string or a number, got {kind}$"):
        read_records(write_lines(tmp_path / "ids.jsonl", rows))
    (tmp_path / "ids.json").write_text(json.dumps(rows), "utf-8")
    with pytest.raises(DataError, match=r"ids\.json: index 2: field id"):
        read_records(tmp_path / "ids.json")
    assert [r["id"] for r in read_records(write_lines(tmp_path / "ok.jsonl", rows[:2]))[0]] == ["3", "2.5"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "Q", "output": "A"}\n{"instruction": "Q2", \n', "utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 2"):
        read_records(path)


def test_malformed_json_array_names_the_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "Q", "output": "A"},\n  {"instruction": }\n]', "utf-8")
    with pytest.raises(DataError, match=r"bad\.json.*line 3, column"):
        read_records(path)


def test_unusable_text_is_rejected_and_reading_continues(tmp_path):
    rows = [
        {"id": "ok1", "instruction": "Q", "output": "A"},
        {"id": "missing", "instruction": "Q"},
        {"id": "null", "instruction": "Q", "output": None},
        {"id": "empty", "instruction": "Q", "output": ""},
        {"id": "blank", "instruction": "Q", "output": " \n\t"},
        {"id": "number", "instruction": "Q", "output": 42},
        {"instruction": 3, "output": "A"},
        {"id": "badinput", "instruction": "Q", "input": 5, "output": "A"},
        [1, 2],
        {"id": "ok2", "instruction": "Q2", "output": "A2"},
    ]
    records, rejects = read_records(write_lines(tmp_path / "d.jsonl", rows))
    assert [r["id"] for r in records] == ["ok1", "ok2"]
    assert [(r["index"], r["id"], r["field"]) for r in rejects] == [
        (1, "missing", "output"),
        (2, "null", "output"),
        (3, "empty", "output"),
        (4, "blank", "output"),
        (5, "number", "output"),
        (6, None, "instruction"),
        (7, "badinput", "input"),
        (8, None, "record"),
    ]
    reasons = [r["reason"] for r in rejects]
    assert reasons[:6] == ["missing", "null", "empty", "whitespace only", "not a string (int)",
                           "not a string (int)"]
    assert all(set(r) == {"index", "id", "field", "reason"} for r in rejects)


def test_unknown_fields_pass_through_untouched(tmp_path):
    row = {"instruction": "Q", "output": "A", "meta": {"a": [1, {"b": None}]}, "score": 0.5,
           "generated_output": "A'"}
    records, _ = read_records(write_lines(tmp_path / "d.jsonl", [row]))
    rec = records[0]
    assert rec["meta"] == row["meta"] and rec["score"] == 0.5 and rec["generated_output"] == "A'"


def test_sharegpt_and_messages_records(tmp_path):
    rows = [
        {"id": "s1", "conversations": [
            {"from": "system", "value": "You are a doctor."},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"}], "tag": "t"},
        {"id": "m1", "messages": [
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]},
        {"id": "multi", "conversations": [
            {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
            {"from": "human", "value": "Q again"}, {"from": "gpt", "value": "A again"}]},
        {"id": "reversed", "messages": [
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]},
        {"id": "noanswer", "messages": [{"role": "user", "content": "Q"},
                                        {"role": "assistant", "content": ""}]},
    ]
    records, rejects = read_records(write_lines(tmp_path / "chat.jsonl", rows))
    assert records == [
        {"id": "s1", "instruction": "Q1", "output": "A1", "tag": "t",
         "system": "You are a doctor."},
        {"id": "m1", "instruction": "Q2", "output": "A2"},
    ]
    assert [(r["id"], r["field"]) for r in rejects] == [
        ("multi", "conversations"), ("reversed", "messages"), ("noanswer", "output")]
    assert "single-turn only" in rejects[0]["reason"]


def test_full_instruction_appends_input_after_a_newline():
    assert full_instruction({"instruction": "Translate:", "input": "hello"}) == "Translate:\nhello"
    assert full_instruction({"instruction": "Translate:", "input": ""}) == "Translate:"
    assert full_instruction({"instruction": "Translate:"}) == "Translate:"


def test_require_fields_rejects_records_without_usable_text():
    records = [
        {"id": "a", "generated_output": "x"},
        {"id": "b"},
        {"id": "c", "generated_output": "  "},
    ]
    kept, rejects = require_fields(records, ["generated_output"])
    assert [r["id"] for r in kept] == ["a"]
    assert rejects == [
        {"index": 1, "id": "b", "field": "generated_output", "reason": "missing"},
        {"index": 2, "id": "c", "field": "generated_output", "reason": "whitespace only"},
    ]


def test_jsonl_round_trip_keeps_unicode_line_separators_and_numpy(tmp_path):
    text = "a\u2028b\u0085c\nd"
    rows = [{"text": text, "v": np.float32(0.5), "arr": np.arange(2)}, {"k": "中文"}]
    path = tmp_path / "out" / "rows.jsonl"
    assert write_jsonl(path, rows) == 2
    assert read_jsonl(path) == [{"text": text, "v": 0.5, "arr": [0, 1]}, {"k": "中文"}]
    records, _ = read_records(write_lines(tmp_path / "r.jsonl", [
        {"instruction": "a\u2028b", "output": "c"}]))
    assert records[0]["instruction"] == "a\u2028b"


def test_read_jsonl_ignores_a_truncated_last_line(tmp_path):
    path = tmp_path / "chunk.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "lo', "utf-8")
    with pytest.warns(UserWarning, match="truncated"):
        assert read_jsonl(path) == [{"id": "a"}, {"id": "b"}]
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n', "utf-8")
    with pytest.raises(DataError, match="line 2"):
        read_jsonl(path)


def test_append_jsonl_resumes_after_a_killed_writer(tmp_path):
    path = tmp_path / "chunk.jsonl"
    assert append_jsonl(path, [{"id": "a"}]) == 1
    with path.open("a", encoding="utf-8") as f:
        f.write('{"id": "b", "par')  # what a kill mid-write leaves
    with pytest.warns(UserWarning, match="truncated"):
        append_jsonl(path, [{"id": "b"}, {"id": "c"}])
    assert read_jsonl(path) == [{"id": "a"}, {"id": "b"}, {"id": "c"}]


def test_write_json_is_atomic_and_fingerprint_hashes_bytes(tmp_path):
    path = tmp_path / "manifest.json"
    write_json(path, {"a": 1})
    write_json(path, {"b": "中"})
    assert json.loads(path.read_text("utf-8")) == {"b": "中"}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_exports_round_trip_through_the_reader(tmp_path):
    rec = {"id": "a", "instruction": "Translate:", "input": "hi", "output": "你好", "system": "S",
           "source": "x"}
    alpaca = to_alpaca(rec)
    assert list(alpaca)[:3] == ["instruction", "input", "output"]
    assert alpaca["id"] == "a" and alpaca["system"] == "S" and alpaca["source"] == "x"
    assert to_alpaca({"id": "b", "instruction": "Q", "output": "A"})["input"] == ""
    share = to_sharegpt(rec)
    assert share == {
        "conversations": [{"from": "human", "value": "Translate:\nhi"},
                          {"from": "gpt", "value": "你好"}],
        "system": "S", "id": "a", "source": "x",
    }
    back, rejects = read_records(write_lines(tmp_path / "s.jsonl", [share]))
    assert rejects == [] and back[0]["instruction"] == "Translate:\nhi"
    assert back[0]["system"] == "S" and back[0]["output"] == "你好"
    back, _ = read_records(write_lines(tmp_path / "a.jsonl", [alpaca]))
    assert back[0] == {"id": "a", "instruction": "Translate:", "input": "hi", "output": "你好",
                       "system": "S", "source": "x"}


def test_unsupported_extension_is_an_error(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello", "utf-8")
    with pytest.raises(DataError, match="unsupported"):
        read_records(path)


def test_duplicate_ids_can_be_renamed_in_file_order(tmp_path):
    rows = [
        {"id": "x", "instruction": "Q1", "output": "A"},
        {"id": "x#2", "instruction": "Q2", "output": "A"},
        {"id": "x", "instruction": "Q3", "output": "A"},
        {"id": "x", "instruction": "Q4", "output": ""},
        {"id": "x", "instruction": "Q5", "output": "A"},
    ]
    path = write_lines(tmp_path / "dup.jsonl", rows)
    with pytest.warns(UserWarning, match=r"3 records reuse.*line 1 and line 3"):
        records, rejects = read_records(path, duplicate_ids="rename")
    assert [r["id"] for r in records] == ["x", "x#2", "x#3", "x#4"]
    assert [(r["index"], r["id"]) for r in rejects] == [(3, "x")]
    with pytest.raises(ValueError):
        read_records(path, duplicate_ids="ignore")


@pytest.mark.skipif(not MEDQUAD.exists(), reason="shared sample data not available")
def test_real_medquad_file_has_one_empty_answer_and_reused_ids():
    # MedQuAD's ids are numbered per source site, so the sample reuses some across sites.
    with pytest.raises(DataError, match=r"id 'medquad-0000072-2' at line 40 and line 57"):
        read_records(MEDQUAD)
    with pytest.warns(UserWarning, match="reuse an earlier id"):
        records, rejects = read_records(MEDQUAD, duplicate_ids="rename")
    assert len(records) + len(rejects) == 3000
    assert len(rejects) == 1 and rejects[0]["field"] == "output"
    assert rejects[0]["reason"] == "empty" and rejects[0]["id"] is not None
    assert len({r["id"] for r in records}) == 2999
    assert all(set(r) == {"id", "instruction", "output", "source", "qtype"} for r in records)


# ------------------------------------------------------------------------------ strictness (issue 13)


def test_ragged_csv_rows_are_rejected_naming_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,instruction,output\na,Q1,A1\nb,Q2,A2,surplus\nc,Q3\nd,\"Q4\nmore\",A4\ne,Q5,A5\n", encoding="utf-8")
    records, rejects = read_records(path)
    assert [r["id"] for r in records] == ["a", "d", "e"] and records[1]["instruction"] == "Q4\nmore"
    assert rejects == [
        {"index": 1, "id": "b", "field": "record", "reason": "line 3: 4 cells, the header has 3"},
        {"index": 2, "id": "c", "field": "record", "reason": "line 4: 2 cells, the header has 3"},
    ]


@pytest.mark.parametrize("text", ["\u200b", " \u200b\u200d\ufeff\t", "\u2060\u00ad", "\u3000\u3164", "\u202e\n"])
def test_texts_blank_after_normalisation_are_rejected(tmp_path, text):
    rows = [{"id": "ok", "instruction": "Q \u200b", "output": "A"}, {"id": "blank", "instruction": text, "output": "A"}]
    records, rejects = read_records(write_lines(tmp_path / "d.jsonl", rows))
    assert [r["id"] for r in records] == ["ok"] and records[0]["instruction"] == "Q \u200b"  # kept unchanged
    assert [(r["index"], r["field"]) for r in rejects] == [(1, "instruction")]
    assert rejects[0]["reason"] in {"whitespace only", "blank: only whitespace and invisible characters (zero-width, format, control)"}
    assert rejects[0]["reason"] != "whitespace only" or not text.strip()


def test_rejects_number_records_by_their_position_in_the_input_file(tmp_path):
    from threeds.io.data import file_positions

    rows = [{"id": "a", "instruction": "Q", "output": "A"}, {"id": "x", "instruction": "", "output": "A"},
            {"id": "b", "instruction": "Q", "output": "A"}, {"id": "c", "instruction": "Q", "output": "A", "generated_output": " "}]  # fmt: skip
    records, rejects = read_records(write_lines(tmp_path / "d.jsonl", rows))
    positions = file_positions(records, rejects)
    assert positions == {"a": 0, "b": 2, "c": 3}
    _, later = require_fields([records[2]], ["generated_output"], positions)
    assert [(r["index"], r["id"]) for r in [*rejects, *later]] == [(1, "x"), (3, "c")]


def test_nan_and_infinity_are_written_as_null_and_nothing_else_changes(tmp_path):
    row = {"id": "a", "score": float("nan"), "w": [1.5, float("inf"), np.float32("-inf")], "n": np.float64(2.5),
           "arr": np.array([np.nan, 1.0]), "text": "NaN", "k": 7}  # fmt: skip
    write_json(tmp_path / "a.json", row)
    write_jsonl(tmp_path / "a.jsonl", [row])
    append_jsonl(tmp_path / "a.jsonl", [row])
    expected = {"id": "a", "score": None, "w": [1.5, None, None], "n": 2.5, "arr": [None, 1.0], "text": "NaN", "k": 7}
    strict = {"parse_constant": lambda name: pytest.fail(f"{name} written")}
    assert json.loads((tmp_path / "a.json").read_text(), **strict) == expected
    assert [json.loads(line, **strict) for line in (tmp_path / "a.jsonl").read_text().splitlines()] == [expected] * 2


def test_writing_over_a_directory_names_it(tmp_path):
    (tmp_path / "out.json").mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        write_json(tmp_path / "out.json", [])
    assert caught.value.filename == str(tmp_path / "out.json")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left


def test_an_input_without_usable_records_is_one_clear_error(tmp_path):
    from threeds.io.data import require_records

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        require_records(empty, *read_records(empty))
    bad = write_lines(tmp_path / "bad.jsonl", [{"id": "a", "instruction": " ", "output": "A"}])
    with pytest.raises(DataError, match=r"bad.jsonl: all 1 records were rejected; the first, at index 0: field instruction"):
        require_records(bad, *read_records(bad))


def test_take_records_first_or_random_subset():
    from threeds.io.data import take_records

    from threeds.config import SubsetConfig

    records = [{"id": str(i)} for i in range(10)]
    assert take_records(records, SubsetConfig()) == records and take_records(records, SubsetConfig(limit=20)) == records
    assert [r["id"] for r in take_records(records, SubsetConfig(limit=3))] == ["0", "1", "2"]
    picked = [int(r["id"]) for r in take_records(records, SubsetConfig(sample=4, sample_seed=7))]
    assert len(picked) == 4 == len(set(picked)) and picked == sorted(picked)
    assert picked == [int(r["id"]) for r in take_records(records, SubsetConfig(sample=4, sample_seed=7))]
    assert take_records(records, SubsetConfig(sample=10)) == records
    with pytest.raises(ValueError, match="not both"):
        take_records(records, SubsetConfig(limit=2, sample=2))
    with pytest.raises(ValueError, match="--sample 0: must be at least 1"):
        take_records(records, SubsetConfig(sample=0))
