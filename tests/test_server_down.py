"""A server that goes down mid-run: the backend stops after a few records in a row, keeps the
finished ones, and the rerun resumes (issue 13: bounded failure against a server)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer

from threeds.config import RateConfig
from threeds.errors import SERVER_DOWN, ServerDownError
from threeds.model.backends import OpenAIBackend
from threeds.stages.rate import load_rating_prompt, rate_records

FAST = {"retries": 1, "backoff": 0.01, "timeout": 5, "concurrency": 1}


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "instruction": f"question {i}", "output": f"answer {i}"} for i in range(n)]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_server_refusing_connections_ends_at_the_probe_in_seconds():
    """Issue 25: one GET /models before the first record; a refused connection is not retried per record."""
    for model in ("m", None):  # with --api-model too, where nothing else would ask /models
        backend = OpenAIBackend(closed_port_url(), model, max_consecutive_failures=5, retries=5, backoff=10.0)
        seen = []
        began = time.monotonic()
        with pytest.raises(ServerDownError, match=r"the server is down: connection failed: .*start it and run the same command again"):
            backend.chat([f"q{i}" for i in range(5)], 4, on_reply=lambda i, r: seen.append(i))
        assert time.monotonic() - began < 60 and not seen  # would be 5 records x 6 attempts with backoff: minutes


def test_unreachable_server_stops_after_n_records_in_a_row():
    with FakeOpenAIServer() as server:  # up for the probe and one answer, then gone
        backend = OpenAIBackend(server.base_url, "m", max_consecutive_failures=3, **FAST)
        assert backend.chat(["first"], 4)[0].error is None
    seen = []
    with pytest.raises(ServerDownError, match="server is down: 3 records in a row failed") as caught:
        backend.chat([f"q{i}" for i in range(50)], 4, on_reply=lambda i, r: seen.append((i, r.error)))
    assert caught.value.exit_code == SERVER_DOWN
    assert [i for i, _ in seen] == [0, 1] and all("connection failed" in e for _, e in seen)  # not 50 records x retries


def test_answers_from_the_server_reset_the_count_and_zero_never_stops():
    with FakeOpenAIServer() as server:
        flaky = [f"q{i} [[q{i};status=500]]" if i % 3 else f"q{i}" for i in range(9)]  # server errors: it is up
        replies = OpenAIBackend(server.base_url, max_consecutive_failures=1, **FAST).chat(flaky, 4)
    assert sum(r.error is not None for r in replies) == 6
    replies = OpenAIBackend(closed_port_url(), "m", max_consecutive_failures=0, **FAST).chat(["a", "b", "c"], 4)
    assert all("connection failed" in r.error for r in replies)


def test_rating_stops_when_the_server_dies_keeps_what_was_rated_and_the_rerun_resumes(tmp_path):
    out, template, data = tmp_path / "ratings.jsonl", load_rating_prompt("general"), records(12)
    served = []

    with FakeOpenAIServer(default_reply=lambda content: "Score: 90") as server:
        def reply(content: str) -> str:
            served.append(content)
            if len(served) == 4:  # the server dies after its 4th answer
                threading.Thread(target=lambda: (server.httpd.shutdown(), server.httpd.server_close())).start()
            return "Score: 90"

        server.default_reply = reply
        backend = OpenAIBackend(server.base_url, max_consecutive_failures=3, **FAST)
        with pytest.raises(ServerDownError, match="records already answered are kept"):
            rate_records(data, backend, out, RateConfig(max_new_tokens=8), template=template, progress=False)
    first = rows(out)
    assert [r["id"] for r in first if r["error"] is None] == ["r0", "r1", "r2", "r3"]
    assert len(first) < 12

    with FakeOpenAIServer(default_reply="Score: 70") as again:  # back up (on another port)
        summary = rate_records(data, OpenAIBackend(again.base_url, **FAST), out, RateConfig(max_new_tokens=8), template=template,
                               progress=False)
        asked = len(again.requests)
    assert (summary["done"], summary["failed"], summary["skipped"]) == (12, 0, 4)
    assert asked == 8  # only the records not rated before
    final = rows(out)
    assert Counter(r["id"] for r in final) == Counter(r["id"] for r in data)
    assert {r["id"]: r["score"] for r in final if r["id"] in {"r0", "r3", "r4", "r11"}} == {
        "r0": 90, "r3": 90, "r4": 70, "r11": 70}
