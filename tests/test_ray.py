"""`--engine ray`: scoring as a Ray Data pipeline on a local 2-CPU cluster gives the single-process
numbers, writes the same run directory, and resumes a run another engine left unfinished."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, make_records

from threeds.data import read_records
from threeds.model import load_model
from threeds.rundir import RunDir
from threeds.score import score_run

ray = pytest.importorskip("ray")

SETTINGS = {"chunk_size": 3, "function_words": "lexical", "progress": False}


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (start-up takes ~10-20 s); yields its address."""
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
    score_run(read_records(data)[0], out, model_spec=str(tiny_model_dir), **SETTINGS)
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
    manifest = score_run(read_records(data)[0], tmp_path / "run", model_spec=str(tiny_model_dir), engine="ray",
                         **SETTINGS)  # fmt: skip
    assert manifest["status"] == "scored" and manifest["engine"]["workers"] == 2
    assert manifest["model"]["architecture"] == "LlamaForCausalLM" and not (tmp_path / "run" / "chunks").exists()
    assert_same_run(tmp_path / "run", reference)


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
        score_run(read_records(data)[0], out, model_spec=str(tiny_model_dir), model=model, tokenizer=tokenizer,
                  **SETTINGS)  # fmt: skip
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
