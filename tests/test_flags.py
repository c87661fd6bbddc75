"""Flags on A' (threeds.selection.answer_flags): the repeat rule, the cap and the blank rule on hand-computed cases,
and the flags of a run directory read back from its files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from synthetic_run import flag_answers, make_run

from threeds.config import flag_list
from threeds.rundir import layout
from threeds.rundir.read import load_run
from threeds.selection.answer_flags import (
    REPEAT_SHARE,
    answer_tokens,
    generation_cap,
    reaches_cap,
    repeat_share,
    repeat_shares,
    run_answer_flags,
    word_tokens,
)
from threeds.selection.answer_flags import (
    flag_answers as flags_of,
)


def test_word_tokens_fold_case_drop_punctuation_and_split_cjk():
    assert word_tokens("Rest, REST; rest-1 x_y") == ["rest", "rest", "rest", "1", "x", "y"]
    assert word_tokens("头痛 fever发热") == ["头", "痛", "fever", "发", "热"]


@pytest.mark.parametrize(
    ("text", "share"),
    [
        # 8 tokens; "nerve damage nerve damage" occurs at 0, 2, 4 (3 times) and covers all 8
        ("nerve damage, nerve damage, nerve damage, nerve damage", 1.0),
        # "x y z w" at 0, 4, 8 covers tokens 0-11 of 13; "y z w x" occurs twice only
        ("x y z w x y z w x y z w q", 12 / 13),
        ("a a a a a", 0.0),  # "a a a a" occurs at 0 and 1: twice
        ("a a a a a a", 1.0),  # at 0, 1, 2: overlapping occurrences count
        ("The cat sat on the mat. The dog sat on the rug.", 0.0),
        ("Rest. rest, REST; rest! rest rest", 1.0),  # case and punctuation do not matter
        ("头痛头痛头痛", 0.0),  # 6 ideographs: "头痛头痛" at 0 and 2
        ("头痛头痛头痛头痛", 1.0),  # 8: at 0, 2, 4
        ("", 0.0),
        ("!!! ...", 0.0),
    ],
)
def test_repeat_share_hand_computed(text, share):
    assert repeat_share(text) == pytest.approx(share)


def test_repeat_share_other_n_and_count():
    # bigrams of "a b a b c": "a b" at 0 and 2 covers tokens 0-3 of 5
    assert repeat_share("a b a b c", n=2, min_count=2) == pytest.approx(0.8)
    assert repeat_share("a b a b c", n=2, min_count=3) == 0.0


def test_repeats_are_counted_within_one_answer_only():
    """The same 4-gram twice in each of two answers is not three times in either."""
    texts = ["a b c d a b c d", "a b c d a b c d", "x y z w x y z w x y z w"]
    assert repeat_shares(texts).tolist() == [0.0, 0.0, 1.0]
    assert repeat_shares(texts).tolist() == [repeat_share(t) for t in texts]


def test_flag_threshold_and_blank_rule():
    half = "x y z w " * 3 + " ".join(f"w{i}" for i in range(12))  # 12 covered of 24: exactly the threshold
    below = "x y z w " * 3 + " ".join(f"w{i}" for i in range(13))  # 12 of 25
    assert REPEAT_SHARE == 0.5
    found = flags_of([half, below, "", " \u200b\ufeff\u2060 ", None, "ok"], None, None)
    assert found.masks["repeats"].tolist() == [True, False, False, False, False, False]
    assert found.masks["empty"].tolist() == [False, False, True, True, True, False]
    assert not found.masks["hit_max"].any()  # no cap: unknown, never set
    assert found.labels().tolist() == ["repeats itself", "", "empty", "empty", "empty", ""]


def test_cap_with_its_slack():
    # cap 512: slack int(5.12) = 5, so 507 and up reach it
    assert reaches_cap(np.array([506, 507, 512, 530, np.nan]), 512).tolist() == [False, True, True, True, False]
    assert reaches_cap(np.array([15, 16]), 16).tolist() == [False, True]  # slack 0 below 100
    found = flags_of(["a", "b"], np.array([511.0, 100.0]), 512)
    assert found.masks["hit_max"].tolist() == [True, False] and found.counts() == {"hit_max": 1, "repeats": 0, "empty": 0}


def test_generation_cap_from_the_manifest():
    assert generation_cap({"stages": {"generate": {"config": {"max_new_tokens": 128}}}}) == 128
    for manifest in ({}, {"stages": {"generate": {"summary": {}}}}, {"stages": {"generate": {"config": {"max_new_tokens": "x"}}}}):
        assert generation_cap(manifest) is None


def test_flag_names_parse_or_name_the_bad_one():
    assert flag_list("hit_max, repeats,empty") == ("hit_max", "repeats", "empty")
    with pytest.raises(ValueError, match="unknown A' flag 'hitmax'; expected some of hit_max,repeats,empty"):
        flag_list("hitmax")


def test_a_run_directory_read_back(tmp_path):
    run_dir = make_run(tmp_path / "run", n=30, n_dropped=0)
    expected = flag_answers(run_dir, cap=400)
    run = load_run(run_dir)
    texts = [r["generated_output"] for r in run.records]
    # the synthetic end-of-turn marker is one token past the end of A' (tests/synthetic_run.py)
    assert answer_tokens(run.metrics, texts, run_dir / "tokens.parquet").tolist() == (run.metrics["gen_tokens"] - 1).tolist()
    found = run_answer_flags(run_dir, run.metrics, run.records, run.manifest)
    assert found.cap == 400
    ids = run.metrics["id"].to_numpy()
    assert {name: ids[mask].tolist() for name, mask in found.masks.items()} == expected
    manifest = json.loads((run_dir / "manifest.json").read_text())
    del manifest["stages"]["generate"]["config"]
    assert not run_answer_flags(run_dir, run.metrics, run.records, manifest).masks["hit_max"].any()
    assert answer_tokens(pd.DataFrame({"id": ["a"]}), ["x"], run_dir / "tokens.parquet") is None


def test_the_generate_logs_finish_reason_decides_hit_max_exactly(tmp_path):
    """Where generations.jsonl says why A' ended, that wins over the re-encoded token count."""
    run_dir = make_run(tmp_path / "run", n=30, n_dropped=0)
    run = load_run(run_dir)
    manifest = json.loads(json.dumps(run.manifest))
    manifest.setdefault("stages", {})["generate"] = {"config": {"max_new_tokens": int(run.metrics["gen_tokens"].median())}}
    guessed = run_answer_flags(run_dir, run.metrics, run.records, manifest).masks["hit_max"]
    assert 0 < guessed.sum() < len(guessed)
    ids = run.metrics["id"].tolist()
    hit, missed = ids[int(np.flatnonzero(guessed)[0])], ids[int(np.flatnonzero(~guessed)[0])]
    rows = [{"id": hit, "generated_output": "x", "error": None, "finish_reason": "stop"},
            {"id": missed, "generated_output": "x", "error": None, "finish_reason": "length"},
            {"id": ids[-1], "generated_output": None, "error": "timeout", "finish_reason": "length"}]  # fmt: skip
    (run_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = run_answer_flags(run_dir, run.metrics, run.records, manifest).masks["hit_max"]
    expected = guessed.copy()
    expected[ids.index(hit)], expected[ids.index(missed)] = False, True  # a failed row says nothing
    assert found.tolist() == expected.tolist()


def test_repeat_shares_are_cached_in_the_run_directory_and_recomputed_when_stale(tmp_path, monkeypatch):
    from threeds.selection import answer_flags as flags

    texts = ["a b c d a b c d a b c d", "one two three", None]
    calls = []
    real = flags.repeat_shares
    monkeypatch.setattr(flags, "repeat_shares", lambda t: calls.append(len(t)) or real(t))
    first = flags.cached_repeat_shares(tmp_path, texts)
    assert first.tolist() == real(["a b c d a b c d a b c d", "one two three", ""]).tolist() and calls == [3]
    assert flags.cached_repeat_shares(tmp_path, texts).tolist() == first.tolist() and calls == [3]  # read back
    changed = flags.cached_repeat_shares(tmp_path, ["one two three", "x", "y"])  # other texts: recomputed
    assert changed.tolist() == [0.0, 0.0, 0.0] and calls == [3, 3]
    (tmp_path / layout.REPEAT_SHARES[0]).write_bytes(b"not a npy file")  # corrupt: recomputed, not an error
    assert flags.cached_repeat_shares(tmp_path, ["one two three", "x", "y"]).tolist() == [0.0, 0.0, 0.0] and calls == [3, 3, 3]
