"""A scoring run killed at any step resumes to the same outputs, every id exactly once, no temp file left.

Not by timing: one run records the directory as a `kill -9` would leave it just before each file
operation (every rename, removal: the steps of writing chunks, consolidating and cleaning up, a
temp file already written and not yet renamed included), and each of those states is resumed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from threeds.config import ModelConfig, ScoreConfig
from threeds.io.data import read_jsonl
from threeds.stages.pipeline import score_run

CONFIG = ScoreConfig(chunk_size=3, function_words="lexical")
STEPS = ("replace", "unlink", "rmdir")
RECORDS = [{"id": f"q{i}", "instruction": f"Fever {i}?", "output": "Rest.", "generated_output": "Fluids."} for i in range(8)]


def kill_states(run: Path, into: Path, monkeypatch) -> list[Path]:
    """Copies of `run` taken just before each rename or removal while the patch is in place."""
    states: list[Path] = []
    real = {name: getattr(os, name) for name in STEPS}
    seen: set[str] = set()

    def hooked(name):
        def call(*args, **kwargs):
            key = content(run) if run.exists() else ""
            if key not in seen:  # a state seen before (an unlink of an absent file, ...) resumes the same way
                seen.add(key)
                states.append(into / f"{len(states):03d}-{name}")
                shutil.copytree(run, states[-1], symlinks=True)
            return real[name](*args, **kwargs)

        return call

    for name in STEPS:
        monkeypatch.setattr(os, name, hooked(name))
    return states


def content(run: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        sha.update(str(path.relative_to(run)).encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()


def outputs(run: Path) -> dict:
    return {
        "metrics": pd.read_parquet(run / "metrics.parquet"), "embeddings": np.load(run / "embeddings.npy"),
        "tokens": pd.read_parquet(run / "tokens.parquet"), "data": read_jsonl(run / "data.jsonl"),
    }  # fmt: skip


def leftovers(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".tmp") or p.name == "chunks"]


def test_a_kill_at_any_step_resumes_to_the_same_outputs(tmp_path, tiny_model, tokenizer, monkeypatch):
    records = RECORDS
    loaded, spec = (tiny_model, tokenizer), ModelConfig()
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        states = kill_states(run, tmp_path / "states", patch)
        score_run(records, run, CONFIG, spec, loaded=loaded, progress=False)
    want = outputs(run)
    ids = [r["id"] for r in records]
    assert list(want["metrics"]["id"]) == ids and len(want["embeddings"]) == len(ids)
    assert len(states) > 20  # 3 chunks x 3 files, the manifest, 4 outputs, the marker, 9 removals + the folder
    manifests = [json.loads((s / "manifest.json").read_text()) for s in states if (s / "manifest.json").exists()]
    mid_cleanup = [s for s, m in zip(states, manifests) if m.get("status") == "scored" and (s / "chunks").exists()]
    assert mid_cleanup and any(len(list((s / "chunks").iterdir())) < 9 for s in mid_cleanup), "no kill while cleaning up"
    assert any(list(s.rglob(".*.tmp")) for s in states), "no kill between a temp file and its rename"
    for state in states:
        manifest = score_run(records, state, CONFIG, spec, loaded=loaded, progress=False)
        got = outputs(state)
        assert manifest["status"] == "scored" and leftovers(state) == [], state.name
        assert list(got["metrics"]["id"]) == ids and [d["id"] for d in got["data"]] == ids, state.name
        assert set(got["tokens"]["id"]) == set(ids) and len(got["tokens"]) == len(want["tokens"]), state.name
        pd.testing.assert_frame_equal(got["metrics"], want["metrics"], check_exact=False, rtol=1e-5)
        np.testing.assert_allclose(got["embeddings"], want["embeddings"], rtol=1e-5, atol=1e-6)


def test_a_chunk_that_lost_a_part_is_scored_again(tmp_path, tiny_model, tokenizer):
    """The state an older threeds left when killed while removing chunks/ before its marker: the
    metrics file of a chunk is there, its embeddings are not. The chunk is redone, not read."""
    records = RECORDS
    loaded = (tiny_model, tokenizer)
    run = tmp_path / "run"
    score_run(records, run, CONFIG, ModelConfig(), loaded=loaded, progress=False)
    want = outputs(run)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "scoring"}))
    from threeds.rundir.write import RunDir

    for index in range(3):  # chunks as they were before consolidation, then one part lost
        rows = slice(3 * index, 3 * index + 3)
        chunk_ids = set(want["metrics"]["id"][rows])
        RunDir(run).write_chunk(index, want["metrics"][rows], want["embeddings"][rows],
                                want["tokens"][want["tokens"]["id"].isin(chunk_ids)])  # fmt: skip
    (run / "chunks" / "000001.emb.npy").unlink()
    (run / "chunks" / ".000002.emb.npy.abc.tmp").write_bytes(b"half")
    assert score_run(records, run, CONFIG, ModelConfig(), loaded=loaded, progress=False)["status"] == "scored"
    got = outputs(run)
    assert list(got["metrics"]["id"]) == [r["id"] for r in records] and leftovers(run) == []
    np.testing.assert_allclose(got["embeddings"], want["embeddings"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("names, kept", [(("manifest.json",), [".umap.npy.x1.tmp", "keep.tmp"]), (None, ["keep.tmp"])])
def test_remove_temps_takes_only_the_writers_own(tmp_path, names, kept):
    from threeds.io.atomic import remove_temps

    for name in (".manifest.json.k3j.tmp", ".umap.npy.x1.tmp", "keep.tmp", ".manifest.json"):
        (tmp_path / name).write_text("x")
    removed = remove_temps(tmp_path, names)
    assert [p.name for p in removed] == [".manifest.json.k3j.tmp"] + ([".umap.npy.x1.tmp"] if names is None else [])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == kept
