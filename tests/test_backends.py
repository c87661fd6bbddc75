"""The two backends: the openai one against a misbehaving fake server and a real llama.cpp server,
the local one on a tiny random model and (integration) on the embedded model."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from fake_openai_server import FakeOpenAIServer

from threeds.config import RateConfig
from threeds.errors import ServerDownError
from threeds.model.backends import BackendError, LocalBackend, OpenAIBackend

FAST = {"retries": 2, "backoff": 0.01, "timeout": 5.0}
PATIENT = FAST | {"timeout": 120.0}  # behind a server's gate: a retried request would count twice in flight


@pytest.fixture()
def server():
    with FakeOpenAIServer() as s:
        yield s


def test_retries_then_success_or_a_clear_failure(server):
    prompts = [
        "plain", "[[a;status=429;times=2]]", "[[b;status=503;times=1]]", "[[c;status=500]]",
        "[[d;body=garbage;times=1]]", "[[e;body=badjson;times=2]]", "[[f;body=nochoices]]",
    ]  # fmt: skip
    replies = OpenAIBackend(server.base_url, **FAST).chat(prompts, 8)
    ok = {p: r for p, r in zip(prompts, replies) if r.error is None}
    assert {p: r.attempts for p, r in ok.items()} == {
        "plain": 1, "[[a;status=429;times=2]]": 3, "[[b;status=503;times=1]]": 2,
        "[[d;body=garbage;times=1]]": 2, "[[e;body=badjson;times=2]]": 3,
    }  # fmt: skip
    assert all(r.text == "85" and r.model == "fake-model" for r in ok.values())
    assert replies[3].text is None and replies[3].attempts == 3 and "HTTP 500" in replies[3].error
    assert "gave up after 3 attempts" in replies[3].error
    assert replies[6].text is None and "malformed reply" in replies[6].error
    assert server.attempts["c;status=500"] == 3  # the client's own retries are off: ours are all there is


def test_slow_reply_times_out_and_is_retried(server):
    backend = OpenAIBackend(server.base_url, retries=1, backoff=0.01, timeout=0.5)
    began = time.perf_counter()
    slow_once, slow_always = backend.chat(["[[s;sleep=60;times=1]]", "[[t;sleep=60]]"], 8)
    assert slow_once.text == "85" and slow_once.attempts == 2
    assert slow_always.text is None and "no reply within 0.5 s" in slow_always.error
    assert time.perf_counter() - began < 30  # not the 60 s a reply takes: wide enough for a busy machine


def test_retry_after_header_and_backoff_are_bounded(server):
    backend = OpenAIBackend(server.base_url, retries=3, backoff=0.05, max_backoff=0.1)
    delays = [backend._delay(n, None) for n in range(1, 8)]
    assert all(0.0 <= d <= 0.1 for d in delays)
    assert backend._delay(1, retry_after=30.0) == 0.1  # a server's Retry-After is honoured up to the cap


@pytest.mark.parametrize(
    ("status", "hint"), [(401, "API key"), (403, "not allowed"), (404, "--base-url"), (400, "request settings")]
)
def test_fatal_statuses_stop_at_once(server, status, hint):
    # one request at a time, the faulty one first: a 400 is fatal only before any request succeeded
    backend = OpenAIBackend(server.base_url, concurrency=1, **FAST)
    with pytest.raises(BackendError, match=hint):
        backend.chat([f"[[z{status};status={status}]]"] + ["plain"] * 3, 8)
    assert server.attempts[f"z{status};status={status}"] == 1


def test_400_after_a_success_fails_only_its_record(server):
    backend = OpenAIBackend(server.base_url, concurrency=1, **FAST)
    good, bad = backend.chat(["plain", "[[y;status=400]]"], 8)
    assert good.text == "85"
    assert bad.text is None and bad.error.startswith("HTTP 400") and bad.attempts == 1


def test_concurrency_is_bounded_and_replies_keep_prompt_order():
    with FakeOpenAIServer(default_reply=lambda content: content.upper(), delay=0.05, gate=3) as server:
        seen = []
        prompts = [f"p{i}" for i in range(12)]
        replies = OpenAIBackend(server.base_url, concurrency=3, **PATIENT).chat(prompts, 8, on_reply=lambda i, r: seen.append(i))
        assert [r.text for r in replies] == [p.upper() for p in prompts]
        assert sorted(seen) == list(range(12))
        assert server.max_in_flight == 3
        assert all(req["temperature"] == 0 and req["max_tokens"] == 8 for req in server.requests)


def test_connections_are_reused_above_a_hundred_in_flight():
    """The SDK's own pool keeps only 100 idle connections: at 150 in flight, 50 would be reopened
    for every wave of requests. The backend sizes the pool to its concurrency."""
    with FakeOpenAIServer(delay=0.05, keep_alive=True, gate=150) as server:
        replies = OpenAIBackend(server.base_url, "m", concurrency=150, **PATIENT).chat(["x"] * 450, 4)
        assert all(r.text == "85" for r in replies)
        assert server.max_in_flight == 150
        assert server.connections <= 160  # about one per worker, not one per request


def test_system_prompt_and_unreachable_server(server):
    OpenAIBackend(server.base_url, system="be brief", **FAST).chat(["plain"], 4)
    assert server.requests[-1]["messages"][0] == {"role": "system", "content": "be brief"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ServerDownError, match="server is down"):
        OpenAIBackend(dead, retries=1, backoff=0.01, timeout=2).chat(["x"], 4)
    (reply,) = OpenAIBackend(dead, "m", retries=1, backoff=0.01, timeout=2, max_consecutive_failures=0).chat(["x"], 4)
    assert "connection failed" in reply.error and reply.attempts == 2


# ------------------------------------------------------------------------------------------- local


def test_local_backend_stops_at_end_of_turn_and_reports_every_reply(tiny_model_dir):
    backend = LocalBackend(str(tiny_model_dir), batch_size=2)
    seen = []
    replies = backend.chat(["short", "a somewhat longer question here", "mid length"], 5, lambda i, r: seen.append(i))
    assert sorted(seen) == [0, 1, 2]
    assert all(isinstance(r.text, str) and r.error is None and r.seconds > 0 for r in replies)
    assert "<|im_end|>" not in "".join(r.text for r in replies)


def test_a_prompt_past_the_context_fails_alone_and_max_new_tokens_is_capped(tiny_model_dir, caplog):
    """A prompt longer than the model's context would stall every short one decoded beside it: it
    fails at once with the reason; the others are answered. --max-new-tokens past the context is
    capped, with one warning."""
    backend = LocalBackend(str(tiny_model_dir), batch_size=2)
    model, _ = backend.load()
    model.config.max_position_embeddings = 48
    seen = []
    replies = backend.chat(["short", "word " * 200, "mid length"], 10**9, lambda i, r: seen.append(i))
    assert seen[0] == 1 and sorted(seen) == [0, 1, 2]  # the rejection is reported first, before any decoding
    assert replies[1].text is None and replies[1].error.startswith("the prompt has ")
    assert "more than the model's context of 48: shorten the record" in replies[1].error
    assert all(r.error is None and isinstance(r.text, str) for r in (replies[0], replies[2]))  # ended: 48 new tokens at most
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["--max-new-tokens 1000000000 is more than the model's context of 48 tokens: capped at 48"]


def test_local_backend_dtype_loads_and_keys_the_log(tiny_model_dir):
    """--dtype reaches the loaded model and the log key; the default key is the one logs had
    before the flag, so they still resume."""
    default = LocalBackend(str(tiny_model_dir))
    assert "dtype" not in default.signature and LocalBackend(str(tiny_model_dir), dtype="auto").signature == default.signature
    bf16 = LocalBackend(str(tiny_model_dir), batch_size=2, dtype="bfloat16")
    assert bf16.signature == default.signature | {"dtype": "bfloat16"}
    model, _ = bf16.load()
    assert model.dtype == torch.bfloat16
    assert all(r.error is None for r in bf16.chat(["short", "a longer question"], 4))


@pytest.mark.integration
def test_local_batched_greedy_equals_one_at_a_time():
    """Left padding must not change the answers: the same greedy text alone and in a batch."""
    prompts = ["What is hypertension?", "Name one symptom of flu.", "Why does a cough last three weeks after a cold?"]
    backend = LocalBackend(batch_size=3)
    batched = [r.text for r in backend.chat(prompts, 12)]
    backend.batch_size = 1
    assert [r.text for r in backend.chat(prompts, 12)] == batched
    assert all(t.strip() for t in batched)


# ------------------------------------------------------------------------------ real llama.cpp server

LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) on the embedded GGUF."""
    if not LLAMA_CPP:
        pytest.skip('llama-cpp-python is not installed: pip install "llama-cpp-python[server]==0.3.36"')
    from threeds.model.files import embedded_gguf_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v1/models", proc, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama.cpp server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if json.load(resp)["data"]:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"llama.cpp server not ready after {timeout} s: {log.read_text()[-2000:]}")


def test_real_llama_cpp_server_rates_and_generates(llama_server, tmp_path):
    from threeds.stages.generate import generate_records
    from threeds.stages.rate import rate_records

    records = [
        {"id": "a", "instruction": "What is hypertension?", "output": "High blood pressure: the force of blood "
         "against artery walls stays too high, which strains the heart and vessels.", "source": "t"},
        {"id": "b", "instruction": "What causes the flu?", "output": "See a doctor."},
        {"id": "c", "instruction": "Name two symptoms of diabetes.", "output": "Thirst and frequent urination."},
    ]  # fmt: skip
    backend = OpenAIBackend(llama_server, concurrency=2, timeout=120, retries=1)
    summary = rate_records(records, backend, tmp_path / "ratings.jsonl", RateConfig(prompt="en-medical", max_new_tokens=8, reasks=1))
    rows = [json.loads(line) for line in (tmp_path / "ratings.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["a", "b", "c"]
    assert summary["done"] + summary["failed"] == 3
    for row in rows:  # a 135M model may not give a number; either way its raw reply is stored
        assert row["backend"] == "openai" and row["model"] == "smollm2" and isinstance(row["raw"], str)
        assert (row["score"] is None) == (row["error"] is not None)

    out, gen = generate_records(records, backend, tmp_path / "gen.jsonl", max_new_tokens=16)
    assert gen["failed"] == 0 and [r["id"] for r in out] == ["a", "b", "c"]
    assert all(r["generated_output"].strip() for r in out) and out[0]["source"] == "t"
