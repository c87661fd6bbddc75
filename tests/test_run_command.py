"""`threeds run` end to end: rate -> filter -> generate -> score -> select, stages skipped when current."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from fake_openai_server import FakeOpenAIServer

from threeds.cli import main as cli
from threeds.io.data import read_jsonl


def _fake_model(content: str) -> str:
    """Rates record i as 50 + 5 i; answers with a few words that depend on i."""
    i = int(re.search(r"question (\d+)", content).group(1))
    if "Reply with the number only" in content:
        return f"Score: {min(100, 50 + 5 * i)}"
    return " ".join(["the", "fever", "may", "pass", "in", "a", "few", "days"][: 2 + i % 6]) + "."


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    rows = [{"id": f"q{i}", "instruction": f"About question {i}: why do I cough at night?",
             "output": "Coughing at night is often caused by postnasal drip or asthma. " * (1 + i % 3), "source": "t"}
            for i in range(12)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_run_end_to_end_then_skips_current_stages(tmp_path, data, tiny_model_dir):
    run = tmp_path / "run"
    with FakeOpenAIServer(default_reply=_fake_model) as server:
        args = ["run", "--data", str(data), "--out", str(run), "--backend", "openai", "--base-url", server.base_url,
                "--model", str(tiny_model_dir), "--function-words", "none", "--low-th", "0", "--up-th", "100",
                "--sample-num", "3", "--max-new-tokens", "20"]  # fmt: skip
        assert cli(args) == 0
        selected = json.loads((run / "selected.json").read_text())
        kept = {f"q{i}" for i in range(7, 12)}  # 50 + 5 i >= 85
        assert len(selected) == 3 and {r["id"] for r in selected} <= kept
        assert all(r["generated_output"] == _fake_model(r["instruction"]) and r["source"] == "t" for r in selected)
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["stages"]["rate"]["data"]["n_records"] == 12 and manifest["stages"]["filter"]["report"]["kept"] == 5
        assert len(manifest["stages"]["rate"]["data"]["fingerprint"]) == 64
        assert json.loads((run / "progress.json").read_text())["stage"] == "done"
        asked, scored, picked = len(server.requests), _mtime(run / "metrics.parquet"), _mtime(run / "selected.json")

        assert cli(args) == 0  # nothing changed: no request, no scoring, no selection
        assert len(server.requests) == asked
        assert (_mtime(run / "metrics.parquet"), _mtime(run / "selected.json")) == (scored, picked)

        assert cli([*args, "--sample-num", "2"]) == 0  # only selection again
        assert len(json.loads((run / "selected.json").read_text())) == 2
        assert _mtime(run / "metrics.parquet") == scored and len(server.requests) == asked

        assert cli([*args, "--quality-threshold", "75"]) == 0  # two more records: A' for them only, then rescore
        assert len(server.requests) == asked + 2
        assert len(read_jsonl(run / "data.jsonl")) == 7
        assert _mtime(run / "metrics.parquet") != scored


def test_run_stops_clearly_when_nothing_passes_stage_one(tmp_path, data, caplog):
    with FakeOpenAIServer(default_reply="Score: 10") as server:
        rc = cli(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--backend", "openai",
                  "--base-url", server.base_url])  # fmt: skip
    assert rc == 1
    assert any("no record passed stage 1" in r.message for r in caplog.records)


@pytest.mark.integration
def test_run_with_the_local_embedded_model_to_a_selected_json(tmp_path):
    """The default path: raw records, the embedded model, nothing else. Threshold 0 keeps every record
    the 135M model managed to rate (it is not a good rater; this checks the plumbing)."""
    source = SHARED_DATA / "medquad_en_200.jsonl"
    if not source.exists():
        pytest.skip(f"{source} not found")
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    shortest = sorted(lines, key=len)[:4]  # short prompts keep this test quick on a CPU
    data = tmp_path / "four.jsonl"
    data.write_text("".join(shortest), encoding="utf-8")
    run = tmp_path / "run"
    rc = cli(["run", "--data", str(data), "--out", str(run), "--quality-threshold", "0", "--max-new-tokens", "16",
              "--max-length", "512", "--sample-num", "2", "--low-th", "0", "--up-th", "100"])  # fmt: skip
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    failed = stages["rate"]["summary"]["failed"] + stages["generate"]["summary"]["failed"]
    assert rc == (3 if failed else 0)  # 3: records left to retry
    ratings = [json.loads(line) for line in (run / "ratings.jsonl").read_text().splitlines()]
    assert len(ratings) == 4 and all(r["backend"] == "local" for r in ratings)
    selected = json.loads((run / "selected.json").read_text())
    assert 1 <= len(selected) <= 2 and all(r["generated_output"] for r in selected)


def test_run_with_failed_records_exits_3_and_counts_rejects(tmp_path, data, tiny_model_dir, caplog):
    """Exit status tells the truth: failed ratings left to retry are exit 3 with a line saying so, and
    records rejected on reading are counted in the rating stage's summary."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows.insert(2, {"id": "blank", "instruction": "\u200b ", "output": "x"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def model(content: str) -> str:
        return "I would rather not say" if "question 11" in content and "Reply with the number only" in content else _fake_model(content)

    run = tmp_path / "run"
    with FakeOpenAIServer(default_reply=model) as server:
        args = ["run", "--data", str(data), "--out", str(run), "--backend", "openai", "--base-url", server.base_url,
                "--model", str(tiny_model_dir), "--function-words", "none", "--low-th", "0", "--up-th", "100",
                "--sample-num", "3", "--max-new-tokens", "20", "--reasks", "0"]  # fmt: skip
        assert cli(args) == 3
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "run the same command again" in r.getMessage()]
    assert any(m.startswith("done with failures: 1 of 12 ratings failed (the first, q11: no score") for m in warned), warned
    status = _status(run)  # issue 25: never "done" while a record failed
    assert (status["state"], status["exit_code"]) == ("done_with_failures", 3) and status["error"].startswith("done with failures")
    assert status["failures"] == {"rate": {"failed": 1, "total": 12, "log": str(run / "ratings.jsonl"), "first": [
        {"id": "q11", "error": "no score from 0 to 100 in the reply", "raw": "I would rather not say"}]}}
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["rate"]["summary"] | {"seconds": 0} == stages["rate"]["summary"] | {
        "total": 12, "done": 11, "failed": 1, "rejected": 1, "seconds": 0}
    assert read_jsonl(run / "rejects.jsonl")[0] | {"reason": ""} == {"index": 2, "id": "blank", "field": "instruction", "reason": ""}
    assert len(json.loads((run / "selected.json").read_text())) == 3  # the run still finished


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def test_limit_and_sample_run_a_subset_and_record_done(tmp_path, data, tiny_model_dir):
    with FakeOpenAIServer(default_reply=_fake_model) as server:
        common = ["--backend", "openai", "--base-url", server.base_url, "--model", str(tiny_model_dir),
                  "--quality-threshold", "0", "--low-th", "0", "--up-th", "100", "--max-new-tokens", "8"]  # fmt: skip
        assert cli(["run", "--data", str(data), "--out", str(tmp_path / "first"), "--limit", "3", *common]) == 0
        assert sorted(r["id"] for r in read_jsonl(tmp_path / "first" / "ratings.jsonl")) == ["q0", "q1", "q2"]
        manifest = json.loads((tmp_path / "first" / "manifest.json").read_text())
        assert manifest["stages"]["rate"]["data"]["n_records"] == 3 and manifest["stages"]["rate"]["data"]["subset"] == {"limit": 3}
        assert _status(tmp_path / "first") | {"pid": 0, "updated": 0} == {"state": "done", "exit_code": 0, "error": None, "pid": 0, "updated": 0}

        picked = []
        for seed in (0, 0, 1):
            out = tmp_path / f"sample{len(picked)}"
            assert cli(["run", "--data", str(data), "--out", str(out), "--sample", "4", "--sample-seed", str(seed), *common]) == 0
            picked.append([r["id"] for r in read_jsonl(out / "filtered.jsonl")])  # all kept, in record order
    assert len(picked[0]) == 4 and picked[0] == picked[1] != picked[2]  # the seed decides, the same every time
    assert picked[0] == sorted(picked[0], key=lambda i: int(i[1:]))  # kept in input order
    for bad, message in ((["--limit", "3", "--sample", "3"], "not both"), (["--limit", "0"], "at least 1")):
        assert cli(["run", "--data", str(data), "--out", str(tmp_path / "bad"), *bad]) == 2  # usage
        assert message in _status(tmp_path / "bad")["error"]


def test_rating_prompt_follows_the_data_language(tmp_path, tiny_model_dir):
    data = tmp_path / "zh.jsonl"
    rows = [{"id": f"z{i}", "instruction": f"问题 {i}：晚上咳嗽是什么原因？", "output": "夜间咳嗽常由鼻后滴漏或哮喘引起。"} for i in range(3)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    def reply(content: str) -> str:
        return "评分：90" if "只回复数字" in content else "多喝水，注意休息。"

    with FakeOpenAIServer(default_reply=reply) as server:
        assert cli(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--backend", "openai", "--base-url",
                    server.base_url, "--model", str(tiny_model_dir), "--low-th", "0", "--up-th", "100"]) == 0  # fmt: skip
        rating_requests = [r for r in server.requests if "只回复数字" in r["messages"][-1]["content"]]
    assert len(rating_requests) == 3
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["rate"]["config"]["prompt"] == "zh-medical"


def test_run_records_failed_and_stopped(tmp_path, data, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "instruction": "q", "output": "a"}\nnot json\n')
    assert cli(["run", "--data", str(bad), "--out", str(tmp_path / "bad")]) == 1
    status = _status(tmp_path / "bad")
    assert status["state"] == "failed" and status["exit_code"] == 1 and "line 2" in status["error"]

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("threeds.commands.run.run_pipeline", interrupted)
    assert cli(["run", "--data", str(data), "--out", str(tmp_path / "stopped")]) == 130
    status = _status(tmp_path / "stopped")
    assert (status["state"], status["exit_code"]) == ("stopped", 130) and status["error"].startswith("interrupted")
