"""The bundled evaluation sets and the readers for a user's own exam file (threeds.outcomes.benchsets)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from threeds.io.data import DataError
from threeds.outcomes.benchsets import BenchItem, eval_data_dir, load_bench, spread


def test_mmlu_medical_is_bundled_whole_with_its_licence():
    bench = load_bench("mmlu-medical")
    assert len(bench.items) == 1089 and len(bench.dev) == 30
    counts = Counter(item.subject for item in bench.items)
    assert counts == {"anatomy": 135, "clinical_knowledge": 265, "college_biology": 144, "college_medicine": 173,
                      "medical_genetics": 100, "professional_medicine": 272}  # fmt: skip
    first = bench.items[0]
    assert first.id == "anatomy-1" and first.gold == 0 and len(first.choices) == 4
    assert first.question.startswith("A lesion causing compression of the facial nerve")
    assert "MIT License" in (eval_data_dir() / "mmlu_medical" / "LICENSE").read_text()
    assert "hendryckstest2021" in (eval_data_dir() / "mmlu_medical" / "README.txt").read_text()


def test_pubmedqa_test_split_with_abstracts():
    bench = load_bench("pubmedqa")
    assert len(bench.items) == 500 and len(bench.dev) == 500
    assert {item.id for item in bench.items}.isdisjoint(item.id for item in bench.dev)
    item = bench.items[0]
    assert item.choices == ["yes", "no", "maybe"] and item.context and item.question.endswith("?")
    truth = json.loads((eval_data_dir() / "pubmedqa" / "test_ground_truth.json").read_text())
    assert all(truth[i.id] == i.choices[i.gold] for i in bench.items)
    assert "MIT License" in (eval_data_dir() / "pubmedqa" / "LICENSE").read_text()


def test_limit_spreads_over_the_subjects():
    assert spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread(list(range(3)), 5) == [0, 1, 2]
    subjects = {item.subject for item in load_bench("mmlu-medical", limit=12).items}
    assert len(subjects) == 6


def test_mmlu_csv_file(tmp_path):
    path = tmp_path / "virology_test.csv"
    path.write_text('"What, exactly?",one,two,three,four,C\nSecond,a,b,B\n', encoding="utf-8")
    items = load_bench(path).items
    assert items == [BenchItem("virology-1", "What, exactly?", ["one", "two", "three", "four"], 2, "virology"),
                     BenchItem("virology-2", "Second", ["a", "b"], 1, "virology")]  # fmt: skip


def test_cmb_style_json_drops_empty_options(tmp_path):
    path = tmp_path / "cmb.json"
    options = {"A": "感染", "B": "肿瘤", "C": "外伤", "D": "中毒", "E": ""}
    rows = [{"exam_subject": "内科", "question": "发热最常见的原因是", "option": options, "answer": "A"},
            {"id": "x7", "question": "Q2", "option": {"A": "p", "B": "q"}, "answer": "B"}]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    items = load_bench(path).items
    assert items[0] == BenchItem("1", "发热最常见的原因是", ["感染", "肿瘤", "外伤", "中毒"], 0, "内科")
    assert items[1].id == "x7" and items[1].gold == 1 and items[1].subject == ""


def test_generic_jsonl_answer_as_letter_index_or_text(tmp_path):
    path = tmp_path / "exam.jsonl"
    rows = [{"id": "a", "question": "Q", "options": ["x", "y", "z"], "answer": "C"},
            {"id": "b", "question": "Q", "options": ["x", "y"], "answer": 1, "subject": "s"},
            {"id": "c", "question": "Q", "options": {"A": "x", "B": "y"}, "answer": "y"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    items = load_bench(path).items
    assert [(i.id, i.gold, i.subject) for i in items] == [("a", 2, ""), ("b", 1, "s"), ("c", 1, "")]


def test_pubmedqa_format_file(tmp_path):
    path = tmp_path / "pqa.json"
    path.write_text(json.dumps({"1": {"QUESTION": "Does it?", "CONTEXTS": ["A.", "B."], "final_decision": "maybe"}}))
    (item,) = load_bench(path).items
    assert item == BenchItem("1", "Does it?", ["yes", "no", "maybe"], 2, "pubmedqa", "A.\nB.")


@pytest.mark.parametrize(("name", "text", "message"), [
    ("bad.jsonl", '{"id": "a", "question": "Q", "options": ["x", "y"], "answer": "C"}\n',
     r"bad.jsonl: line 1 \(id a\): answer 'C' is not among the options A, B"),
    ("dup.jsonl", '{"id": "a", "question": "Q", "options": ["x", "y"], "answer": 0}\n' * 2,
     r"dup.jsonl: duplicate id 'a' \(items 1 and 2\)"),
    ("torn.jsonl", '{"id": "a", "question": "Q"\n', r"torn.jsonl: line 1: invalid JSON"),
    ("one.jsonl", '{"id": "a", "question": "Q", "options": ["x"], "answer": 0}\n',
     r"one.jsonl: line 1 \(id a\): needs at least two non-empty options"),
    ("noq.json", '[{"options": ["x", "y"], "answer": 0}]', r"noq.json: item 1: no question text"),
    ("short_test.csv", "Q,a,A\n", r"short_test.csv: row 1: expected question, at least two options"),
    ("letter_test.csv", "Q,a,b,E\n", r"letter_test.csv: row 1: answer 'E' is not among the options A, B"),
    ("exam.txt", "hello", r"unknown evaluation file type .txt"),
])  # fmt: skip
def test_a_bad_file_is_one_line_naming_file_and_item(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message) as caught:
        load_bench(path)
    assert "\n" not in str(caught.value)


def test_unknown_spec():
    with pytest.raises(DataError, match="neither one of mmlu-medical, pubmedqa nor an existing file"):
        load_bench("mmlu-everything")
