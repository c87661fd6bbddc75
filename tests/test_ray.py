"""`--engine ray` on a local 2-CPU cluster: scoring gives the single-process numbers, writes the same run
directory and resumes a run another engine left unfinished; local-backend generation gives the
single-process answers into the same per-record log, and either engine finishes the other's log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, make_records

from threeds.cli import main as cli
from threeds.config import EngineConfig, ModelConfig, ScoreConfig
from threeds.io.data import read_jsonl, read_records, write_jsonl
from threeds.model.backends import LocalBackend
from threeds.model.load import load_model
from threeds.rundir.write import RunDir
from threeds.stages.generate import generate_records
from threeds.stages.pipeline import score_run

ray = pytest.importorskip("ray")
from threeds.stages.engine_ray import RayLocalBackend  # noqa: E402  (after the skip: it needs Ray only when used)

SETTINGS = ScoreConfig(chunk_size=3, function_words="lexical")
RAY = EngineConfig(engine="ray")


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (start-up takes ~10-20 s); yields its address. Its workers
    run at the suite's own priority: Ray starts them at niceness 15, and on a saturated machine
    (busy loops beside the suite) they then got so little CPU that the model actors were still
    importing torch after 25 minutes."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_worker_niceness", "0")  # read by the raylet this init starts
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray-data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_records(14, seed=7)))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data):
    """The single-process run of the same records."""
    out = tmp_path_factory.mktemp("ray-ref") / "run"
    score_run(read_records(data)[0], out, SETTINGS, ModelConfig(model=str(tiny_model_dir)), progress=False)
    return out


def assert_same_run(run, reference, skip_ids=()):
    metrics, expected = (pd.read_parquet(p / "metrics.parquet") for p in (run, reference))
    keep = ~metrics.id.isin(skip_ids).to_numpy()
    pd.testing.assert_frame_equal(metrics[keep], expected[keep], rtol=1e-5)
    emb, emb_ref = (np.load(p / "embeddings.npy", allow_pickle=False) for p in (run, reference))
    np.testing.assert_allclose(emb[keep], emb_ref[keep], rtol=1e-5, atol=1e-6)
    tokens, tokens_ref = (pd.read_parquet(p / "tokens.parquet") for p in (run, reference))
    pd.testing.assert_frame_equal(tokens, tokens_ref, rtol=1e-5, atol=1e-7)


def test_ray_engine_gives_the_single_process_numbers(cluster, tmp_path, tiny_model_dir, data, reference):
    manifest = score_run(read_records(data)[0], tmp_path / "run", SETTINGS, ModelConfig(model=str(tiny_model_dir)), RAY, progress=False)
    assert manifest["status"] == "scored" and manifest["engine"]["workers"] == 2
    assert manifest["model"]["architecture"] == "LlamaForCausalLM" and not (tmp_path / "run" / "chunks").exists()
    assert_same_run(tmp_path / "run", reference)


def test_ray_engine_loads_the_requested_dtype(cluster, tmp_path, tiny_model_dir, data):
    records = read_records(data)[0][:4]
    bf16 = ModelConfig(model=str(tiny_model_dir), dtype="bfloat16")
    manifest = score_run(records, tmp_path / "run", SETTINGS, bf16, RAY, progress=False)
    assert manifest["model"]["dtype"] == "torch.bfloat16" and manifest["score_config"]["dtype"] == "bfloat16"
    assert RayLocalBackend(str(tiny_model_dir), dtype="bfloat16").signature["dtype"] == "bfloat16"


class Interrupted(RuntimeError):
    pass


def test_cli_ray_resumes_an_interrupted_local_run(cluster, tmp_path, tiny_model_dir, data, reference):
    """A local run stopped after two chunks is finished by `threeds score --engine ray --ray-address`:
    finished chunks are kept as they are (one is marked to prove it), the rest computed on Ray."""
    out = tmp_path / "run"
    model, tokenizer = load_model(str(tiny_model_dir))

    def stop_after_two_chunks(*_):
        if len(RunDir(out).done_chunks()) == 2:
            raise Interrupted

    model.model.register_forward_pre_hook(stop_after_two_chunks)
    with pytest.raises(Interrupted):
        score_run(read_records(data)[0], out, SETTINGS, ModelConfig(model=str(tiny_model_dir)), loaded=(model, tokenizer), progress=False)
    marked = out / "chunks" / "000000.metrics.parquet"
    metrics = pd.read_parquet(marked).assign(ins_ppl=-1.0)
    metrics.to_parquet(marked, index=False)

    result = subprocess.run(
        [sys.executable, "-m", "threeds", "score", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir),
         "--chunk-size", "3", "--function-words", "lexical", "--engine", "ray", "--ray-address", cluster],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    final = pd.read_parquet(out / "metrics.parquet")
    assert (final.ins_ppl.iloc[:3] == -1.0).all() and (final.ins_ppl.iloc[3:] > 0).all()
    assert_same_run(out, reference, skip_ids=list(metrics.id))
    assert json.loads((out / "manifest.json").read_text())["engine"]["address"] == cluster


# ------------------------------------------------------------------------------ A' generation on Ray

GEN_TOKENS = 8


@pytest.fixture(scope="module")
def gen_records():
    """Prompts of varied length, so batches are formed by length as in the single-process backend."""
    words = "why does my chest hurt when I cough at night and what should I take".split()
    return [{"id": f"g{i}", "instruction": " ".join(words[: 2 + (5 * i) % 13]) + "?", "output": "x"} for i in range(7)]


@pytest.fixture(scope="module")
def gen_reference(tmp_path_factory, tiny_model_dir, gen_records):
    """Single-process local generation of the same records: id -> log row."""
    log_path = tmp_path_factory.mktemp("gen-ref") / "g.jsonl"
    generate_records(gen_records, LocalBackend(str(tiny_model_dir), batch_size=2), log_path, GEN_TOKENS, progress=False)
    rows = {r["id"]: r for r in read_jsonl(log_path)}
    assert len(rows) == len(gen_records) and any(r["generated_output"] for r in rows.values())
    return rows


def _answers(rows) -> dict:
    return {r["id"]: (r["generated_output"], r["error"]) for r in rows}


def test_ray_generation_gives_the_single_process_answers(cluster, tmp_path, tiny_model_dir, gen_records, gen_reference):
    log_path = tmp_path / "g.jsonl"
    backend = RayLocalBackend(str(tiny_model_dir), batch_size=2)
    out, summary = generate_records(gen_records, backend, log_path, GEN_TOKENS, progress=False)
    rows = read_jsonl(log_path)
    assert _answers(rows) == _answers(gen_reference.values())  # text for text (greedy is deterministic)
    assert [r["key"] for r in rows] == [gen_reference[r["id"]]["key"] for r in rows]  # same log, same keys
    assert {(r["backend"], r["model"]) for r in rows} == {("local", str(tiny_model_dir))}
    assert summary["done"] + summary["failed"] == len(gen_records) and summary["skipped"] == 0
    assert [r["id"] for r in out] == [r["id"] for r in gen_records if gen_reference[r["id"]]["error"] is None]
    # the single-process engine takes the Ray engine's log as its own: nothing left to do, no model loaded
    local = LocalBackend(str(tiny_model_dir), batch_size=2)
    _, again = generate_records(gen_records, local, log_path, GEN_TOKENS, progress=False)
    assert (again["skipped"], again["new"], local.model) == (summary["done"], again["failed"], None)


def test_cli_ray_generation_finishes_a_local_log(cluster, tmp_path, tiny_model_dir, gen_records, gen_reference):
    """`threeds generate --engine ray` on a log the local engine started: finished rows are kept as they
    are (one is marked to prove it), a failed one is retried, the rest are generated on Ray."""
    data, out, log_path = tmp_path / "d.jsonl", tmp_path / "g.jsonl", tmp_path / "g.generations.jsonl"
    write_jsonl(data, gen_records)
    backend = LocalBackend(str(tiny_model_dir), batch_size=2)
    generate_records(gen_records[:3], backend, log_path, GEN_TOKENS, progress=False)
    rows = read_jsonl(log_path)
    rows[0] = {**rows[0], "generated_output": "kept from the local run", "error": None}
    rows[1] = {**rows[1], "generated_output": None, "error": "HTTP 500: try again"}
    write_jsonl(log_path, rows)

    args = ["generate", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir), "--batch-size", "2",
            "--max-new-tokens", str(GEN_TOKENS), "--engine", "ray", "--ray-address", cluster,
            "--ray-workers", "2"]  # fmt: skip
    expected = {**_answers(gen_reference.values()), rows[0]["id"]: ("kept from the local run", None)}
    assert cli(args) == (0 if all(error is None for _, error in expected.values()) else 3)
    final = read_jsonl(log_path)
    assert Counter(r["id"] for r in final) == Counter(r["id"] for r in gen_records)  # every id exactly once
    assert _answers(final) == expected
    written = {r["id"]: r["generated_output"] for r in read_jsonl(out)}
    assert written == {i: text for i, (text, error) in expected.items() if error is None}


def test_ray_engine_with_the_openai_backend_is_an_error(tmp_path, caplog):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"id": "a", "instruction": "q?", "output": "a"}])
    args = ["generate", "--data", str(data), "--out", str(tmp_path / "g.json"), "--backend", "openai", "--engine", "ray"]
    assert cli(args) == 1
    assert "--engine ray" in caplog.text and "--backend openai" in caplog.text
    assert not (tmp_path / "g.generations.jsonl").exists()


def test_a_local_cluster_threeds_starts_runs_its_workers_at_the_drivers_priority(monkeypatch):
    """Ray starts workers at niceness 15: beside other work they crawl. threeds asks for 0 when it
    may start the cluster itself, leaves a cluster at an address alone, and a user's own setting stays."""
    from threeds.stages import engine_ray

    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address, **kw: seen.append((address, os.environ.get("RAY_worker_niceness"))))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    assert engine_ray._connect(None) is True
    monkeypatch.delenv("RAY_worker_niceness")
    engine_ray._connect("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    engine_ray._connect(None)
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_worker_niceness", "5")
    engine_ray._connect(None)
    assert seen == [(None, "0"), ("ray://head:10001", None), (None, None), (None, "5")]
