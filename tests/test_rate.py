"""Stage 1: score parsing, prompts, resumable rating through the fake server, kill and rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer

from threeds.cli import main as cli
from threeds.config import RateConfig
from threeds.model.backends import OpenAIBackend
from threeds.stages.joblog import StaleResultsError
from threeds.stages.rate import (
    NO_SCORE,
    PROMPT_NAMES,
    PromptError,
    filter_by_rating,
    load_rating_prompt,
    parse_score,
    rate_records,
    render,
)

ROOT = Path(__file__).resolve().parents[1]

RATE = RateConfig(prompt="en-medical", max_new_tokens=8, reasks=2)


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("85", 85), ("85\n", 85), (" 90 ", 90), ("100", 100), ("0", 0), ("72.5", 72.5), ("**92**", 92),
        ("Score: 85", 85), ("score:85", 85), ("SCORE - 61", 61), ("Rating: 77", 77), ("I would give it a score of 88.", 88),
        ("85/100", 85), ("85 / 100", 85), ("I rate it 85 out of 100.", 85), ("Score: 100/100", 100), ("85%", 85),
        ("８５", 85), ("Ｓｃｏｒｅ：８５", 85), ("８５／１００", 85), ("评分：90", 90), ("得分：75分", 75), ("85分", 85),
        ("满分100分，得分85分", 85), ("总分 66", 66),
        ("On a scale of 0-100, I give 72.", 72), ("score (0~100): 40", 40), ("0 to 100: 55", 55),
        ("The answer is thorough and accurate. 80", 80), ("2023 guidelines; score 60", 60),
        ("Score: 150. Sorry, I mean 90", 90), ("1. 90\n2. 40", 90), ("85.", 85), ("Score: 1. Really.", 1),
    ],
)  # fmt: skip
def test_parse_score_finds_the_score(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize(
    "reply",
    [None, "", "   ", "I cannot rate this.", "N/A", "150", "1000", "7/10", "Rating: 4.5/5", "8 out of 10", "-",
     "0-100", "满分100", "八十五", "One whole number from 0 to", "1. Question: what is it?", "1) the answer\n2) more"],
)  # fmt: skip
def test_parse_score_gives_none_when_there_is_no_score(reply):
    assert parse_score(reply) is None


def test_shipped_prompts_have_both_slots_and_the_spec_parts():
    for name in PROMPT_NAMES:
        text = load_rating_prompt(name)
        assert text.count("{instruction}") == 1 and text.count("{output}") == 1
        assert "80-100" in text and "0-19" in text and "90" in text and "40" in text and "5" in text


def test_render_fills_slots_once_and_leaves_other_braces(tmp_path):
    user = tmp_path / "p.txt"
    user.write_text('Q: {instruction}\nA: {output}\nJSON like {"score": 1} stays.', encoding="utf-8")
    rec = {"id": "1", "instruction": "why {output}?", "input": "ctx", "output": "because {instruction}"}
    assert render(load_rating_prompt(str(user)), rec) == 'Q: why {output}?\nctx\nA: because {instruction}\nJSON like {"score": 1} stays.'
    (tmp_path / "bad.txt").write_text("only {instruction}")
    with pytest.raises(PromptError, match="output"):
        load_rating_prompt(str(tmp_path / "bad.txt"))
    with pytest.raises(PromptError, match="no such file"):
        load_rating_prompt("zh-legal")


def test_filter_keeps_scores_at_or_above_threshold_and_counts_unrated():
    records = [{"id": i} for i in "abcde"]
    ratings = [{"id": "a", "score": 85.0}, {"id": "b", "score": 84.9}, {"id": "c", "score": None, "error": "x"},
               {"id": "d", "score": 100.0}]  # fmt: skip
    kept, report = filter_by_rating(records, ratings, 85)
    assert [r["id"] for r in kept] == ["a", "d"]
    assert report == {"quality_threshold": 85, "total": 5, "kept": 2, "below": 1, "unrated": 2}


def test_filter_command_writes_the_kept_records(tmp_path, capsys):
    data, ratings = tmp_path / "d.jsonl", tmp_path / "r.jsonl"
    data.write_text("".join(json.dumps({"id": i, "instruction": "q", "output": "a", "extra": i}) + "\n" for i in "abc"))
    ratings.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "a", "score": 90.0}, {"id": "b", "score": 50.0}]))
    for name in ("kept.json", "kept.jsonl"):
        assert cli(["filter", "--data", str(data), "--ratings", str(ratings), "--out", str(tmp_path / name)]) == 0
    assert json.loads((tmp_path / "kept.json").read_text()) == [{"id": "a", "instruction": "q", "output": "a", "extra": "a"}]
    assert _rows(tmp_path / "kept.jsonl") == json.loads((tmp_path / "kept.json").read_text())
    assert '"unrated": 1' in capsys.readouterr().out


def _records(n: int, directives: dict[int, str] | None = None) -> list[dict]:
    directives = directives or {}
    return [{"id": f"r{i}", "instruction": f"question {i} [[r{i};{directives.get(i, '')}]]", "output": f"answer {i}"}
            for i in range(n)]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rate_records_retries_records_failures_and_reruns_only_failures(tmp_path):
    out = tmp_path / "ratings.jsonl"
    records = _records(6, {1: "status=429;times=2", 2: "status=500;times=3", 3: "reply=I cannot rate this",
                           4: "reply=hmm;times=1", 5: "body=garbage;times=1"})  # fmt: skip
    template = load_rating_prompt("general")
    with FakeOpenAIServer(default_reply="Score: 88") as server:
        backend = OpenAIBackend(server.base_url, retries=2, backoff=0.01)
        summary = rate_records(records, backend, out, RATE, template=template, progress=False)
        rows = {r["id"]: r for r in _rows(out)}
        assert summary | {"seconds": 0} == {"stage": "rate", "total": 6, "done": 4, "failed": 2, "skipped": 0, "new": 4,
                                            "seconds": 0, "log": str(out), "first_failures": [
            {"id": "r2", "error": "HTTP 500: fake 500 (gave up after 3 attempts)"},
            {"id": "r3", "error": NO_SCORE, "raw": "I cannot rate this"}]}  # fmt: skip
        assert len(_rows(out)) == 6  # the pending rows of r3 and r4 were settled by their last reply
        assert rows["r1"]["score"] == 88 and rows["r1"]["attempts"] == 3
        assert rows["r2"]["score"] is None and "HTTP 500" in rows["r2"]["error"]  # backend gave up after 3 attempts
        assert rows["r3"] == rows["r3"] | {"score": None, "raw": "I cannot rate this", "error": NO_SCORE, "attempts": 3}
        assert rows["r4"]["score"] == 88 and rows["r4"]["attempts"] == 2  # re-asked once with the reminder
        assert server.requests[-1]["messages"][-1]["content"].endswith("and nothing else.")
        assert rows["r5"]["score"] == 88 and rows["r0"]["raw"] == "Score: 88" and rows["r0"]["model"] == "fake-model"
        asked = len(server.requests)

        summary = rate_records(records, backend, out, RATE, template=template, progress=False,
                               progress_path=tmp_path / "progress.json")  # r2 now recovers
        assert (summary["done"], summary["failed"], summary["skipped"]) == (5, 1, 4)
        assert len(server.requests) - asked == 1 + 3  # only the two failures were asked again
        assert Counter(r["id"] for r in _rows(out)) == Counter(f"r{i}" for i in range(6))
        assert json.loads((tmp_path / "progress.json").read_text())["done"] == 6


def test_changed_prompt_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "ratings.jsonl"
    records = _records(3)
    with FakeOpenAIServer() as server:
        backend = OpenAIBackend(server.base_url, retries=0)
        rate_records(records, backend, out, RateConfig(prompt="general", max_new_tokens=8), progress=False)
        with pytest.raises(StaleResultsError, match="3 results"):
            rate_records(records, backend, out, RATE, progress=False)
        summary = rate_records(records, backend, out, RATE, overwrite=True, progress=False)
    assert summary["new"] == 3 and len(_rows(out)) == 3


def test_rate_command_fatal_error_is_one_clear_line(tmp_path, caplog):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(3, {0: "status=401"})))
    with FakeOpenAIServer() as server:
        rc = cli(["rate", "--data", str(data), "--out", str(tmp_path / "r.jsonl"), "--backend", "openai",
                  "--base-url", server.base_url, "--concurrency", "1"])  # fmt: skip
    assert rc == 1
    assert [r.levelname for r in caplog.records if "HTTP 401" in r.message] == ["ERROR"]


def _wait_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail(f"fewer than {n} rows in {path} after {timeout} s")


def test_interrupted_and_killed_rate_subprocess_loses_nothing_and_duplicates_nothing(tmp_path):
    data, out = tmp_path / "d.jsonl", tmp_path / "run" / "ratings.jsonl"
    records = _records(40)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with FakeOpenAIServer(delay=0.15) as server:
        cmd = [sys.executable, "-m", "threeds", "rate", "--data", str(data), "--out", str(out), "--backend", "openai",
               "--base-url", server.base_url, "--concurrency", "2"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_rows(out, 4, first)
        first.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = first.communicate(timeout=60)
        assert first.returncode == 130 and "interrupted" in err

        second = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_rows(out, len(_rows(out)) + 4, second)
        second.kill()
        second.wait()
        finished = {r["id"]: r for r in _rows(out)}
        assert 8 <= len(finished) < 40
        with out.open("a") as f:  # what a kill in the middle of a write leaves behind
            f.write('{"id": "r39", "sco')

        server.delay = 0.0
        with pytest.warns(UserWarning, match="truncated last line"):
            assert cli(cmd[3:]) == 0
    rows = _rows(out)
    assert Counter(r["id"] for r in rows) == Counter(r["id"] for r in records)
    assert all(r["score"] == 85 for r in rows)
    assert all(finished[r["id"]] == r for r in rows if r["id"] in finished)  # finished rows kept as they were


def test_prompt_for_language():
    from threeds.stages.rate import prompt_for_language

    english = [{"instruction": "Why do I cough at night?", "output": "Often postnasal drip."}]
    chinese = [{"instruction": "晚上咳嗽是什么原因？", "input": "三天了", "output": "常见原因是鼻后滴漏 (PND)。"}]
    assert prompt_for_language(english) == "en-medical"
    assert prompt_for_language(chinese) == "zh-medical"
    assert prompt_for_language(chinese + english * 3) == "en-medical"  # judged on the whole text
