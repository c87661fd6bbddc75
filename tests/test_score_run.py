"""The run directory: files read back, resume after a real kill, config changes, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, make_records
from waiting import WAIT, wait_for

from threeds.config import ModelConfig, ScoreConfig
from threeds.io.data import read_jsonl
from threeds.names import SCORE_COLUMNS
from threeds.rundir.check import read_scored_records
from threeds.rundir.record_index import RecordFile
from threeds.rundir.sources import scored_sources
from threeds.rundir.write import RunError
from threeds.selection.answer_flags import cached_answer_checks, repeat_shares
from threeds.stages.pipeline import score_run


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def threeds(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "threeds", *args], cwd=ROOT, capture_output=True, text=True, **kwargs)


def test_score_run_writes_every_file(tmp_path, tiny_model_dir):
    records = make_records(7)
    records[3]["generated_output"] = "  "  # rejected, the rest still scored
    lexical, model = ScoreConfig(chunk_size=3, function_words="lexical"), ModelConfig(model=str(tiny_model_dir))
    manifest = score_run(records, tmp_path / "run", lexical, model, progress=False)
    run = tmp_path / "run"
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert list(metrics.columns) == SCORE_COLUMNS
    assert list(metrics.id) == [r["id"] for r in records if r["id"] != "r3"]
    emb = np.load(run / "embeddings.npy", allow_pickle=False)
    assert emb.dtype == np.float32 and emb.shape == (6, 32)
    data = read_jsonl(run / "data.jsonl")
    assert [d["id"] for d in data] == list(metrics.id) and data[0]["source"] == "synthetic"
    tokens = pd.read_parquet(run / "tokens.parquet")
    assert set(tokens.id) == set(metrics.id)
    counts = tokens.groupby(["id", "response"]).size()
    assert counts.loc[(metrics.id[0], "gt")] == metrics.gt_tokens[0]
    rejects = read_jsonl(run / "rejects.jsonl")
    assert rejects[0]["id"] == "r3" and rejects[0]["field"] == "generated_output"
    assert set(manifest["timings"]) == {"load_seconds", "score_seconds"}
    assert manifest["data"]["n_scored"] == 6 and manifest["data"]["n_rejected"] == 1
    assert manifest["status"] == "scored" and "transformers" in manifest["packages"]
    assert not (run / "chunks").exists()
    # what a reader would otherwise parse data.jsonl for is left beside it: each record's source, its A' checks
    found = read_scored_records(run, list(metrics.id))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(RecordFile, "field", lambda *a, **k: pytest.fail("data.jsonl parsed again"))
        m.setattr(RecordFile, "codes", lambda *a, **k: pytest.fail("data.jsonl parsed again"))
        codes, names = scored_sources(run, found)
        shares, empty = cached_answer_checks(run, found)
    assert [names[c] for c in codes] == ["synthetic"] * 6 and not empty.any()
    assert shares.tolist() == repeat_shares([d["generated_output"] for d in data]).tolist()
    # same config again: nothing recomputed; another config: refused unless --overwrite
    assert score_run(records, run, lexical, model, progress=False)["timings"] == manifest["timings"]
    with pytest.raises(RunError, match="--overwrite"):
        score_run(records, run, ScoreConfig(chunk_size=3, max_length=64), model, progress=False)
    redone = score_run(records, run, ScoreConfig(chunk_size=3, max_length=64), model, overwrite=True, progress=False)
    assert redone["score_config"]["max_length"] == 64


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, tiny_model_dir):
    records = make_records(300, seed=5)
    data = write_jsonl(tmp_path / "data.jsonl", records)
    out = tmp_path / "run"
    args = ["score", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir), "--chunk-size", "3",
            "--function-words", "lexical"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "threeds", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(lambda: len(list((out / "chunks").glob("*.metrics.parquet"))) >= 3, "3 chunks scored")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((out / "chunks").glob("*.metrics.parquet")))
    assert 3 <= done_at_kill < 100 and not (out / "metrics.parquet").exists(), "the kill must land mid-run"
    result = threeds(*args)
    assert result.returncode == 0, result.stderr
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics.id) == [r["id"] for r in records]
    reference = score_run(records, tmp_path / "ref", ScoreConfig(chunk_size=3, function_words="lexical"), ModelConfig(model=str(tiny_model_dir)),
                          progress=False)  # fmt: skip
    assert reference["status"] == "scored"
    expected = pd.read_parquet(tmp_path / "ref" / "metrics.parquet")
    pd.testing.assert_frame_equal(metrics, expected, rtol=1e-5)
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert not tokens.duplicated(["id", "response", "pos"]).any()
    assert len(tokens) == len(pd.read_parquet(tmp_path / "ref" / "tokens.parquet"))


def test_interrupted_run_stops_promptly_and_resumes(tmp_path, tiny_model_dir):
    """Ctrl-C (SIGINT) mid-run: the process leaves within seconds, its background threads blocking
    nothing, says how to continue; the same command then finishes the run."""
    records = make_records(300, seed=6)
    data = write_jsonl(tmp_path / "data.jsonl", records)
    out = tmp_path / "run"
    args = ["score", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir), "--chunk-size", "3",
            "--function-words", "lexical"]  # fmt: skip
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "threeds", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: len(list((out / "chunks").glob("*.metrics.parquet"))) >= 2, "2 chunks scored")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=WAIT)  # a thread blocking the exit would hang it
    assert code == 130 and "interrupted" in (tmp_path / "stderr.txt").read_text()
    assert not (out / "metrics.parquet").exists(), "the interrupt must land mid-run"
    result = threeds(*args)
    assert result.returncode == 0, result.stderr
    assert list(pd.read_parquet(out / "metrics.parquet").id) == [r["id"] for r in records]


def test_cli_score_then_select(tmp_path, tiny_model_dir):
    records = make_records(20, seed=2)
    data = write_jsonl(tmp_path / "data.jsonl", records + [{"id": "bad", "instruction": "", "output": "x"}])
    out = tmp_path / "run"
    result = threeds("score", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir),
                     "--function-words", "none")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["report"]["n_scored"] == 20
    assert read_jsonl(out / "rejects.jsonl")[0]["id"] == "bad"
    sel = tmp_path / "selected.json"
    result = threeds("select", "--run", str(out), "--out", str(sel), "--sample-num", "3", "--corr-low", "0")
    assert result.returncode == 0, result.stderr
    selected = json.loads(sel.read_text())
    assert len(selected) == 3 and {"instruction", "output", "generated_output", "source"} <= set(selected[0])
    selection = json.loads((out / "selection.json").read_text())
    assert [r["id"] for r in selected] == selection["selected_ids"]


def test_dtype_is_loaded_recorded_and_guards_resume(tmp_path, tiny_model_dir):
    """--dtype bfloat16 loads the model in bf16, is part of the run's config (so a float32 rerun
    does not mix precisions in one run), and the default leaves the config as before the flag."""
    records = make_records(6, seed=4)
    common = {"score": ScoreConfig(function_words="none"), "progress": False}
    default = score_run(records, tmp_path / "fp32", spec=ModelConfig(model=str(tiny_model_dir)), **common)
    assert "dtype" not in default["score_config"] and default["model"]["dtype"] == "torch.float32"
    bf16 = score_run(records, tmp_path / "bf16", spec=ModelConfig(model=str(tiny_model_dir), dtype="bfloat16"), **common)
    assert bf16["score_config"]["dtype"] == "bfloat16" and bf16["model"]["dtype"] == "torch.bfloat16"
    a = pd.read_parquet(tmp_path / "fp32" / "metrics.parquet")
    b = pd.read_parquet(tmp_path / "bf16" / "metrics.parquet")
    assert (a["id"] == b["id"]).all()
    for column in ("ins_ppl", "gt_wloss_mean", "gen_wloss_max"):
        np.testing.assert_allclose(b[column], a[column], rtol=2e-2)  # bf16 round-off, see test_bf16.py
    with pytest.raises(RunError, match="another configuration"):
        score_run(records, tmp_path / "bf16", spec=ModelConfig(model=str(tiny_model_dir)), **common)


def test_scores_of_an_older_version_are_not_mixed_in(tmp_path, tiny_model_dir):
    """A run scored before the prompt was tokenised on its own (no `score_version` in its manifest):
    resuming it refuses in one line that says why; --overwrite scores it again, as version 2."""
    records, run = make_records(4, seed=8), tmp_path / "run"
    settings = {"score": ScoreConfig(chunk_size=2, function_words="none"), "spec": ModelConfig(model=str(tiny_model_dir)),
                "progress": False}  # fmt: skip
    assert score_run(records, run, **settings)["score_config"]["score_version"] == 2
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["score_config"]["score_version"]
    manifest["status"] = "scoring"
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match=r"older threeds \(scores version 1, this one makes 2") as refused:
        score_run(records, run, **settings)
    assert "\n" not in str(refused.value) and "--overwrite" in str(refused.value)
    assert score_run(records, run, overwrite=True, **settings)["score_config"]["score_version"] == 2


def test_cli_reports_bad_input_clearly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "instruction": "q", "output": "a", "generated_output": "b"}\n{"id": oops}\n')
    result = threeds("score", "--data", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "bad.jsonl" in result.stderr and "line 2" in result.stderr


def test_help_explains_flags():
    result = threeds("score", "--help")
    assert result.returncode == 0
    for flag in ("--max-length", "--function-words", "--batch-tokens", "--dtype", "Instruction Understanding"):
        assert flag in result.stdout
    result = threeds("select", "--help")
    for flag in ("--low-th", "--up-th", "--sample-num", "--atten-method", "--ins-low", "k-center"):
        assert flag in result.stdout


def test_both_engines_offer_the_engine_interface():
    """`score_chunks` drives any `Engine`: this process's and Ray's both have start, results and close."""
    from threeds.config import EngineConfig
    from threeds.stages.engine import Engine
    from threeds.stages.engine_ray import RayEngine
    from threeds.stages.score import LocalEngine

    assert isinstance(LocalEngine(ScoreConfig(), ModelConfig()), Engine)
    assert isinstance(RayEngine(ScoreConfig(), ModelConfig(), EngineConfig(engine="ray")), Engine)
    assert not isinstance(object(), Engine)
