"""Loading run directories for the app: partial runs, damaged files, counts, background runs."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from synthetic_run import make_run
from waiting import WAIT, wait_for

from threeds.cli import build_parser
from threeds.commands.run import config_from_args
from threeds.config import (
    BackendConfig,
    DataConfig,
    FilterConfig,
    GenerateConfig,
    ModelConfig,
    RateConfig,
    RunConfig,
    SelectConfig,
    SubsetConfig,
    run_command,
)  # fmt: skip
from threeds.errors import LockedError
from threeds.rundir.jobs import StopResult, job_running, start_run, stop_run
from threeds.rundir.read import (
    list_runs,
    load_run,
    read_progress,
    run_key,
)
from threeds.selection.apply import percentile_ranks
from threeds.selection.funnel import stage_counts
from threeds.selection.quality import quality_mask
from threeds.stages.rate import filter_by_rating


@pytest.fixture()
def run_dir(tmp_path):
    return make_run(tmp_path / "cache" / "r1", n=30, n_dropped=6)


def test_full_run_loads_aligned(run_dir):
    run = load_run(run_dir)
    assert run.errors == {}
    assert len(run.metrics) == len(run.records) == run.embeddings.shape[0] == 30
    assert run.embeddings.dtype == np.float32
    assert run.ratings["score"].isna().sum() == 1  # the unrated one
    sid = run.metrics["id"].iloc[3]
    assert run.record(sid) == run.records[3] and run.records[3]["id"] == sid
    assert run.record("d000001")["instruction"].startswith("What is")  # dropped by Stage 1: from the input file
    tokens = run.tokens(sid)
    assert set(tokens["id"]) == {sid}
    assert list(tokens["response"].unique()) == ["gt", "gen"]
    assert (np.diff(tokens.loc[tokens["response"] == "gt", "pos"]) == 1).all()


def test_input_file_found_beside_a_moved_run(run_dir, tmp_path, monkeypatch):
    """A manifest naming its input relative to another working directory (the shipped demo's
    "cache/demo/input.jsonl") still finds the copy in the run directory."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["data"]["path"] = "elsewhere/cache/r1/input.jsonl"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    run = load_run(run_dir)
    assert run.input_path == run_dir / "input.jsonl"
    assert run.record("d000001")["instruction"].startswith("What is")
    (run_dir / "input.jsonl").unlink()
    assert load_run(run_dir).record("d000001") is None


def test_stage_counts_follow_the_files(run_dir):
    run = load_run(run_dir)
    counts = stage_counts(run)
    assert counts["input records"] == 36 and counts["rejected"] == 1
    assert counts["rated (Stage 1)"] == 35
    assert counts["kept by quality"] == 30  # threshold 85 from the manifest
    assert counts["scored (Stage 2)"] == 30 and counts["selected"] is None


def test_quality_mask_matches_the_filter_command(run_dir):
    run = load_run(run_dir)
    ratings = [json.loads(line) for line in (run_dir / "ratings.jsonl").read_text().splitlines()]
    records = list(run.input_records.values())
    for threshold in (0, 40.5, 85, 99):
        kept, _ = filter_by_rating(records, ratings, threshold)
        assert quality_mask(run.ratings["score"].to_numpy(), threshold).sum() == len(kept)


def test_stage1_only_run(tmp_path):
    run = load_run(make_run(tmp_path / "s1", stages=("rate",)))
    assert run.errors == {} and run.ratings is not None
    assert run.metrics is None and run.records is None and run.embeddings is None
    assert stage_counts(run)["scored (Stage 2)"] is None


@pytest.mark.parametrize(
    "file, damage, message",
    [
        ("manifest.json", lambda p: p.write_text("{not json"), "corrupt JSON"),
        ("metrics.parquet", lambda p: p.write_bytes(b"PAR1 garbage"), "cannot read Parquet"),
        ("ratings.jsonl", lambda p: p.write_text('{"id": "a", "score": 1}\n{broken\n{"id": "b"}\n'), "invalid JSON on line 2"),
        ("embeddings.npy", lambda p: np.save(p, np.zeros((3, 4), np.float32)), "does not match 30 rows"),
        ("data.jsonl", lambda p: p.write_text(p.read_text().split("\n", 1)[1]), "do not match metrics.parquet"),
    ],
)
def test_damaged_file_is_reported_not_raised(run_dir, file, damage, message):
    damage(run_dir / file)
    run = load_run(run_dir)
    assert message in run.errors[file]
    assert str(run_dir / file) in run.errors[file]
    assert set(run.errors) == {file}


def test_missing_metric_column_is_reported(run_dir):
    import pandas as pd

    frame = pd.read_parquet(run_dir / "metrics.parquet").drop(columns=["gt_wloss_max"])
    frame.to_parquet(run_dir / "metrics.parquet")
    assert "missing columns ['gt_wloss_max']" in load_run(run_dir).errors["metrics.parquet"]


def test_tokens_missing_or_corrupt_raise_with_the_path(run_dir):
    from threeds.rundir.read import RunFileError

    run = load_run(run_dir)
    (run_dir / "tokens.parquet").write_bytes(b"junk")
    with pytest.raises(RunFileError, match="cannot read Parquet"):
        run.tokens("s000000")
    (run_dir / "tokens.parquet").unlink()
    with pytest.raises(RunFileError, match="missing"):
        run.tokens("s000000")


def test_list_runs_skips_models_and_uploads(tmp_path):
    cache = tmp_path / "cache"
    make_run(cache / "a", n=5, n_dropped=0)
    (cache / "models" / "m").mkdir(parents=True)
    (cache / "uploads").mkdir()
    assert [p.name for p in list_runs(cache)] == ["a"]
    assert list_runs(tmp_path / "nowhere") == []


def test_run_key_follows_the_files_the_run_is_loaded_from(run_dir):
    before = run_key(run_dir)
    assert load_run(run_dir).key == before
    (run_dir / "umap.npy").write_bytes(b"")  # the app's own cache: not part of the run
    assert run_key(run_dir) == before
    (run_dir / "selection.json").write_text("{}")
    assert run_key(run_dir) != before


def test_percentile_ranks():
    """The inspector's and the samples table's rank: % of the finite values at or below each value."""
    values = np.array([1.0, 2.0, 3.0, 4.0, np.nan, np.inf])
    ranks = percentile_ranks(np.array([2.0, 0.5, 4.0, np.nan, np.inf]), values)
    assert ranks[:3].tolist() == [50.0, 0.0, 100.0] and np.isnan(ranks[3:]).all()
    assert np.isnan(percentile_ranks(np.array([1.0]), np.array([np.nan]))).all()


def test_run_command_is_accepted_by_the_cli(tmp_path):
    config = RunConfig(
        data=DataConfig("rename"), model=ModelConfig(model="some/model"),
        backend=BackendConfig(backend="openai", base_url="http://127.0.0.1:1/v1", api_model="m"),
        rate=RateConfig(max_new_tokens=9), filter=FilterConfig(80), generate=GenerateConfig(max_new_tokens=33),
        select=SelectConfig(low_th=10, up_th=90, conf_up=80.5, sample_num=7, atten_method="max"),
    )  # fmt: skip
    argv = run_command(tmp_path / "d.jsonl", tmp_path / "out", config)
    assert argv[:4] == [sys.executable, "-m", "threeds", "run"]
    assert "--rate-max-new-tokens" in argv and "--sample-num" in argv and "--seed" not in argv  # defaults left out
    assert config_from_args(build_parser().parse_args(argv[3:])) == config
    small = RunConfig(
        subset=SubsetConfig(limit=5), model=ModelConfig(dtype="bfloat16"), backend=BackendConfig(batch_size=4),
        rate=RateConfig(prompt="zh-medical"), generate=GenerateConfig(max_new_tokens=64),
    )  # fmt: skip
    argv = run_command(tmp_path / "d.jsonl", tmp_path / "out", small)
    assert "--limit" in argv and "--max-new-tokens" in argv and "--rate-max-new-tokens" not in argv
    assert config_from_args(build_parser().parse_args(argv[3:])) == small
    sampled = RunConfig(subset=SubsetConfig(sample=9, sample_seed=3))
    assert config_from_args(build_parser().parse_args(run_command("d", "o", sampled)[3:])) == sampled


def test_background_job_start_status_stop(tmp_path):
    run_dir = tmp_path / "job"
    script = (
        "from threeds.cli import honour_interrupts; honour_interrupts()\n"  # as `threeds` does
        "import json, time, pathlib, sys\n"
        "p = pathlib.Path(sys.argv[1])\n"
        "for i in range(10**9):\n"
        "    p.joinpath('progress.json').write_text(json.dumps({'stage': 'rate', 'done': i, 'total': 600, 'updated': time.time()}))\n"
        "    time.sleep(0.05)\n"
    )
    pid = start_run([sys.executable, "-c", script, str(run_dir)], run_dir)
    assert pid > 0 and job_running(run_dir)
    with pytest.raises(LockedError, match="already in progress"):
        start_run([sys.executable, "-c", "pass"], run_dir)
    wait_for(lambda: read_progress(run_dir) is not None, "progress.json written")
    assert read_progress(run_dir)["stage"] == "rate"
    assert stop_run(run_dir, grace=(WAIT, WAIT, WAIT)) == StopResult(("SIGINT",), stopped=True)
    assert not job_running(run_dir)
    assert "KeyboardInterrupt" in (run_dir / "run.log").read_text()
    assert stop_run(run_dir).signals == ()
