"""Issue 25, honest runs: a run never says "done" when records failed (status.json, the exit code,
the Runs page), the preflight stops a run that cannot work after 2 records, a refused server ends a
run in seconds, progress says what the run is doing, and a stop keeps every reply that arrived."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer
from streamlit.testing.v1 import AppTest
from synthetic_run import make_run
from waiting import wait_for

from threeds.cli import main as cli
from threeds.config import RateConfig
from threeds.model.backends import LocalBackend, Reply
from threeds.rundir.progress import read_status, write_status
from threeds.rundir.read import read_progress
from threeds.stages.rate import NO_SCORE, REMINDER, load_rating_prompt, rate_records
from threeds.views import embed_map

ROOT = Path(__file__).resolve().parents[1]
RATING = "只回复数字"  # in the zh-medical prompt only


def chinese_data(path: Path, n: int = 10) -> Path:
    rows = [{"id": f"z{i}", "instruction": f"问题 {i}：晚上咳嗽是什么原因？", "output": "夜间咳嗽常由鼻后滴漏或哮喘引起。"} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def english_prose(content: str) -> str:
    """The English 135M model on the Chinese prompt: prose, no score."""
    return "The answer explains a common cause of coughing at night." if RATING in content else "Drink water and rest."


def server_args(server: FakeOpenAIServer, data: Path, out: Path) -> list[str]:
    return ["run", "--data", str(data), "--out", str(out), "--backend", "openai", "--base-url", server.base_url,
            "--reasks", "0"]  # fmt: skip


def ratings_asked(server: FakeOpenAIServer) -> int:
    return sum(RATING in r["messages"][-1]["content"] for r in server.requests)


def test_preflight_stops_a_chinese_prompt_on_a_model_that_answers_in_english(tmp_path):
    data = chinese_data(tmp_path / "zh.jsonl")
    with FakeOpenAIServer(default_reply=english_prose) as server:
        assert cli(server_args(server, data, tmp_path / "run")) == 1  # bad settings
        asked = ratings_asked(server)
    status = read_status(tmp_path / "run")
    assert asked == 2 and status["state"] == "failed"
    assert status["error"].startswith("preflight: no rating could be read from the model's replies to the first 2 records")
    assert "zh-medical is Chinese and the model answers in another language" in status["error"]
    assert "--no-preflight" in status["error"]

    with FakeOpenAIServer(default_reply=english_prose) as server:  # skipped: every record is asked
        assert cli([*server_args(server, data, tmp_path / "all"), "--no-preflight"]) == 1
        assert ratings_asked(server) == 10
    assert "no record passed stage 1" in read_status(tmp_path / "all")["error"]


def test_preflight_passes_when_one_rating_is_read_and_stops_when_no_answer_comes_back(tmp_path):
    data = chinese_data(tmp_path / "zh.jsonl", n=4)

    def score_one(content: str) -> str:  # z1 is rated; every A' comes back empty
        return ("评分：90" if "问题 1" in content else english_prose(content)) if RATING in content else ""

    with FakeOpenAIServer(default_reply=score_one) as server:
        assert cli(server_args(server, data, tmp_path / "run")) == 1
        answers = [r for r in server.requests if RATING not in r["messages"][-1]["content"]]
    error = read_status(tmp_path / "run")["error"]
    assert error.startswith("preflight: the model wrote no answer (A') to the first 2 instructions (every reply was empty)")
    assert len(answers) == 2 and all(r["max_tokens"] == 32 for r in answers)  # short: a probe, not the A'


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.mark.parametrize("records", [4, 10])
def test_a_refused_server_ends_the_run_in_seconds_naming_the_server(tmp_path, records):
    """Issue 25: 2-3 minutes of retries (10 records), or 'no record passed stage 1' after 40 s (4)."""
    data = chinese_data(tmp_path / "zh.jsonl", n=records)
    url = closed_port_url()
    began = time.monotonic()
    rc = cli(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--backend", "openai", "--base-url", url,
              "--api-model", "m"])  # fmt: skip
    assert rc == 6 and time.monotonic() - began < 30  # not minutes: wide enough for a busy machine
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and status["error"].startswith(f"{url}: the server is down: connection failed")


class StopAfter:
    """A backend that replies like `backend` and is stopped (Ctrl-C, the app's Stop) after `n` replies."""

    def __init__(self, backend, n: int) -> None:
        self.backend, self.n, self.name, self.label = backend, n, backend.name, backend.label
        self.signature = backend.signature

    def load(self):
        return self.backend.load()

    def chat(self, prompts, max_new_tokens, on_reply=None):
        seen = []

        def counted(i: int, reply: Reply) -> None:
            on_reply(i, reply)
            seen.append(i)
            if len(seen) == self.n:
                raise KeyboardInterrupt

        return self.backend.chat(prompts, max_new_tokens, counted)


class Recorder:
    """Replies 'Score: 70' and records the prompts it was asked."""

    name, label = "local", "rec"

    def __init__(self, signature: dict) -> None:
        self.signature, self.asked = signature, []

    def chat(self, prompts, max_new_tokens, on_reply=None):
        self.asked += prompts
        replies = [Reply("Score: 70", 0.01) for _ in prompts]
        for i, reply in enumerate(replies):
            on_reply(i, reply)
        return replies


def test_a_stop_inside_a_batch_keeps_every_reply_that_arrived(tmp_path, tiny_model_dir):
    """The tiny random model writes no score: each reply awaits its re-ask. Stopped after 3 replies of
    a batch of 6, those 3 are in the log, and the rerun goes on with their re-ask, not the first question."""
    records = [{"id": f"r{i}", "instruction": f"question {i} " * (1 + i), "output": f"answer {i}"} for i in range(6)]
    out, template = tmp_path / "ratings.jsonl", load_rating_prompt("general")
    local = LocalBackend(str(tiny_model_dir), batch_size=6)
    with pytest.raises(KeyboardInterrupt):
        rate_records(records, StopAfter(local, 3), out, RateConfig(max_new_tokens=4), template=template, progress=False)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(kept) == 3 and all(r["pending"] and r["round"] == 0 and r["error"] == NO_SCORE for r in kept)

    again = Recorder(local.signature)
    summary = rate_records(records, again, out, RateConfig(max_new_tokens=4), template=template, progress=False)
    reasked = [p for p in again.asked if p.endswith(REMINDER)]
    assert len(reasked) == 3 and len(again.asked) == 6  # 3 first questions, 3 re-asks, nothing asked twice
    assert (summary["done"], summary["failed"]) == (6, 0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"r{i}" for i in range(6)] and not any(r.get("pending") for r in rows)
    assert sum(r["attempts"] == 2 for r in rows) == 3  # the kept reply counts as an attempt


# ------------------------------------------------------------------------------------ the Runs page


@pytest.fixture()
def run_dir(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("THREEDS_CACHE", str(cache))
    monkeypatch.setattr(embed_map, "compute_umap", lambda emb, settings=None: np.asarray(emb[:, :2], np.float32))
    return make_run(cache / "demo", n=20, n_dropped=5)


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_runs_page_is_never_green_while_records_failed(run_dir):
    log = run_dir / "ratings.jsonl"
    failed = [{"id": f"z{i}", "score": None, "raw": "The answer explains", "error": NO_SCORE} for i in range(9)]
    log.write_text("".join(json.dumps(r) + "\n" for r in [*failed, {"id": "z9", "score": 90.0, "raw": "90", "error": None}]))
    failures = {"rate": {"failed": 9, "total": 10, "log": str(log), "first": [{"id": "z0", "error": NO_SCORE, "raw": "The answer explains"}]}}
    write_status(run_dir, "done_with_failures", exit_code=3, error="done with failures: ...", failures=failures)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception and not at.success
    assert "Done with failures (exit code 3): 9 of 10 ratings failed" in texts(at.warning)
    tables = [d.value for d in at.dataframe]
    assert any(list(t.columns[:3]) == ["stage", "id", "error"] and t.iloc[0]["id"] == "z0" for t in tables)
    assert any(len(t) == 9 and set(t["error"]) == {NO_SCORE} for t in tables)  # every failed record, on demand

    write_status(run_dir, "done", exit_code=3, error="done, but 0 samples selected: widen the bands")
    at.run()
    assert not at.success and "0 samples selected" in texts(at.warning)


def test_runs_page_shows_the_phase_from_the_first_second(run_dir):
    from threeds.rundir.jobs import job_running, start_run, stop_run

    script = (
        "from threeds.cli import honour_interrupts; honour_interrupts()\n"  # as `threeds` does: Stop's SIGINT ends it
        "import sys, time\n"
        "from threeds.rundir.progress import ProgressFile\n"
        "ProgressFile(sys.argv[1] + '/progress.json', 'rate', 10).phase('loading the model')\n"
        "time.sleep(600)\n"
    )
    start_run([sys.executable, "-c", script, str(run_dir)], run_dir)
    write_status(run_dir, "running")
    try:
        wait_for(lambda: "loading" in ((read_progress(run_dir) or {}).get("phase") or ""), "the phase written")
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
        assert job_running(run_dir)
        assert "Now: loading the model, " in texts(at.caption) and " s so far" in texts(at.caption)
    finally:
        stop_run(run_dir)
