"""A' generation: generated_output beside the original fields, resumable per record, CLI outputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer

from threeds.cli import main as cli
from threeds.model.backends import LocalBackend, OpenAIBackend
from threeds.stages.generate import generate_records


def _echo(content: str) -> str:
    return f"A' to: {content}"


def _records() -> list[dict]:
    return [
        {"id": "a", "instruction": "What is flu?", "output": "A virus.", "source": "s1", "generated_output": "old"},
        {"id": "b", "instruction": "Explain [[b;status=500;times=2]]", "input": "ctx", "output": "x"},
        {"id": "c", "instruction": "[[c;reply=   ]]", "output": "y"},
        {"id": "d", "instruction": "[[d;status=503]]", "output": "z"},
    ]  # fmt: skip


def test_generated_output_beside_original_fields_and_failures_retried(tmp_path):
    log = tmp_path / "gen.jsonl"
    with FakeOpenAIServer(default_reply=_echo) as server:
        backend = OpenAIBackend(server.base_url, retries=1, backoff=0.01)
        out, summary = generate_records(_records(), backend, log, max_new_tokens=32, progress=False)
        assert [r["id"] for r in out] == ["a"]
        assert out[0] == {"id": "a", "instruction": "What is flu?", "output": "A virus.", "source": "s1",
                          "generated_output": "A' to: What is flu?"}  # fmt: skip
        rows = {r["id"]: r for r in map(json.loads, log.read_text().splitlines())}
        assert rows["b"]["error"].startswith("HTTP 500") and rows["c"]["error"] == "empty reply"
        assert (summary["done"], summary["failed"]) == (1, 3)
        assert all(req["max_tokens"] == 32 for req in server.requests)

        out, summary = generate_records(_records(), backend, log, max_new_tokens=32, progress=False)
        assert [r["id"] for r in out] == ["a", "b"]  # input order, whatever the finishing order
        assert out[1]["generated_output"] == "A' to: Explain [[b;status=500;times=2]]\nctx"  # instruction + input
        assert (summary["done"], summary["failed"], summary["skipped"]) == (2, 2, 1)
        assert Counter(json.loads(line)["id"] for line in log.read_text().splitlines()) == Counter("abcd")


def test_generate_command_writes_json_or_jsonl_and_resumes(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_records()[:2]))
    with FakeOpenAIServer(default_reply=_echo) as server:
        args = ["generate", "--data", str(data), "--backend", "openai", "--base-url", server.base_url,
                "--retries", "1", "--retry-backoff", "0.01", "--max-new-tokens", "7"]  # fmt: skip
        assert cli([*args, "--out", str(tmp_path / "g.json")]) == 3  # b fails once: exit 3 = finished with failures
        assert [r["id"] for r in json.loads((tmp_path / "g.json").read_text())] == ["a"]
        assert (tmp_path / "g.generations.jsonl").exists()
        assert cli([*args, "--out", str(tmp_path / "g.json")]) == 0
        assert [r["id"] for r in json.loads((tmp_path / "g.json").read_text())] == ["a", "b"]
        asked = len(server.requests)
        assert cli([*args, "--out", str(tmp_path / "g.jsonl"), "--log", str(tmp_path / "g.generations.jsonl")]) == 0
        assert len(server.requests) == asked  # everything was in the log already
    lines = (tmp_path / "g.jsonl").read_text().splitlines()
    assert [json.loads(line)["generated_output"] for line in lines] == json_outputs(tmp_path / "g.json")


def json_outputs(path: Path) -> list[str]:
    return [r["generated_output"] for r in json.loads(path.read_text())]


def test_changed_max_new_tokens_redoes_only_with_overwrite(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(_records()[0]) + "\n")
    with FakeOpenAIServer(default_reply=_echo) as server:
        args = ["generate", "--data", str(data), "--out", str(tmp_path / "g.json"), "--backend", "openai",
                "--base-url", server.base_url]  # fmt: skip
        assert cli(args) == 0
        assert cli([*args, "--max-new-tokens", "9"]) == 1
        assert cli([*args, "--max-new-tokens", "9", "--overwrite"]) == 0
        assert server.requests[-1]["max_tokens"] == 9


def test_local_backend_generates_for_records(tmp_path, tiny_model_dir):
    backend = LocalBackend(str(tiny_model_dir), batch_size=2)
    records = [{"id": str(i), "instruction": f"question number {i}", "output": "x"} for i in range(3)]
    out, summary = generate_records(records, backend, tmp_path / "g.jsonl", max_new_tokens=4, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert {r["backend"] for r in rows} == {"local"} and all(r["model"] == str(tiny_model_dir) for r in rows)
    # a random model may emit end-of-turn at once: such an answer is a failure, never an empty A'
    assert all(r["generated_output"] for r in out) and summary["done"] + summary["failed"] == 3


@pytest.mark.integration
def test_local_backend_on_embedded_model(tmp_path):
    records = [{"id": "a", "instruction": "What is hypertension?", "output": "High blood pressure."},
               {"id": "b", "instruction": "Name one symptom of flu.", "output": "Fever."}]  # fmt: skip
    out, summary = generate_records(records, LocalBackend(batch_size=2), tmp_path / "g.jsonl", max_new_tokens=16, progress=False)
    assert summary["failed"] == 0 and [r["id"] for r in out] == ["a", "b"]
    assert all(len(r["generated_output"].split()) >= 3 for r in out)


def test_progress_file_counts_each_record_as_it_finishes(tmp_path, monkeypatch):
    """progress.json follows each reply the backend reports, not a batch or the end of the stage."""
    from functools import partial

    from threeds.model.backends import Reply
    from threeds.rundir import progress
    from threeds.stages import joblog

    monkeypatch.setattr(joblog, "ProgressFile", partial(progress.ProgressFile, min_interval=0))
    seen = []

    class OneByOne:
        name, label, signature = "fake", "fake", {"backend": "fake"}

        def chat(self, prompts, max_new_tokens, on_reply=None):
            for i, prompt in enumerate(prompts):
                seen.append(json.loads((tmp_path / "progress.json").read_text())["done"])
                on_reply(i, Reply(text=f"answer {i}", seconds=0.1))
            return []

    records = [{"id": f"r{i}", "instruction": f"q{i}", "output": "a"} for i in range(4)]
    generate_records(records, OneByOne(), tmp_path / "generations.jsonl", 8, progress=False, progress_path=tmp_path / "progress.json")
    assert seen == [0, 1, 2, 3]
    final = json.loads((tmp_path / "progress.json").read_text())
    assert (final["stage"], final["done"], final["total"], final["done_at_start"]) == ("generate", 4, 4, 0)
