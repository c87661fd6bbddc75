"""Every setting is checked once, by the config dataclasses, before any data or model is touched:
`problems` lists what is wrong (for the app's form), `check_settings`/`from_args` raise one line
naming the flag, the value and the allowed range (exit status 2)."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from threeds.config import (
    BackendConfig,
    FilterConfig,
    GenerateConfig,
    RateConfig,
    RunConfig,
    ScoreConfig,
    SelectConfig,
    SubsetConfig,
    check_settings,
    first_problem,
    problems,
)  # fmt: skip
from threeds.errors import USAGE, SettingsError


def test_defaults_are_valid():
    assert problems(RunConfig()) == {}
    for part in dataclasses.fields(RunConfig):
        assert problems(getattr(RunConfig(), part.name)) == {}, part.name


@pytest.mark.parametrize("config, field, message", [
    (SelectConfig(sample_num=0), "sample_num", "must be at least 1"),
    (SelectConfig(low_th=-1.0), "low_th", "must be within 0-100"),
    (SelectConfig(corr_up=100.5), "corr_up", "must be within 0-100"),
    (SelectConfig(quality_threshold=150.0), "quality_threshold", "must be within 0-100"),
    (SelectConfig(seed=-1), "seed", "must be at least 0"),
    (SelectConfig(atten_method="median"), "atten_method", "must be one of mean, max"),
    (SelectConfig(sample_num=2.5), "sample_num", "must be a whole number"),
    (SelectConfig(sample_num=True), "sample_num", "must be a whole number"),
    (SelectConfig(low_th=float("nan")), "low_th", "must be a finite number"),
    (FilterConfig(quality_threshold=150.0), "quality_threshold", "must be within 0-100"),
    (BackendConfig(batch_size=0), "batch_size", "must be at least 1"),
    (BackendConfig(batch_size=-1), "batch_size", "must be at least 1"),
    (BackendConfig(gen_batch_tokens=0), "gen_batch_tokens", "must be at least 1"),
    (BackendConfig(concurrency=0), "concurrency", "must be at least 1"),
    (BackendConfig(timeout=0.0), "timeout", "must be more than 0"),
    (BackendConfig(timeout=float("inf")), "timeout", "must be a finite number"),
    (BackendConfig(retries=-1), "retries", "must be at least 0"),
    (BackendConfig(retry_backoff=-0.5), "retry_backoff", "must be at least 0"),
    (BackendConfig(max_consecutive_failures=-1), "max_consecutive_failures", "must be at least 0"),
    (BackendConfig(base_url="localhost:8000"), "base_url", "must be an http:// or https:// URL"),
    (RateConfig(max_new_tokens=0), "max_new_tokens", "must be at least 1"),
    (RateConfig(reasks=-5), "reasks", "must be at least 0"),
    (GenerateConfig(max_new_tokens=0), "max_new_tokens", "must be at least 1"),
    (ScoreConfig(max_length=1), "max_length", "must be at least 2"),
    (ScoreConfig(chunk_size=0), "chunk_size", "must be at least 1"),
    (ScoreConfig(batch_tokens=0), "batch_tokens", "must be at least 1"),
    (SubsetConfig(limit=0), "limit", "must be at least 1"),
    (SubsetConfig(limit=2, sample=3), "sample", "not with --limit"),
])  # fmt: skip
def test_each_bad_setting_is_named_with_its_range(config, field, message):
    found = problems(config)
    assert list(found) == [field] and found[field].startswith(message), found
    with pytest.raises(SettingsError) as caught:
        check_settings(config)
    assert caught.value.exit_code == USAGE and message in str(caught.value)


def test_the_line_names_the_flag_and_the_value():
    assert first_problem(SelectConfig(sample_num=0)) == "--sample-num 0: must be at least 1"
    assert first_problem(SelectConfig(quality_threshold=150.0)) == "--quality-threshold 150: must be within 0-100"
    assert first_problem(BackendConfig(base_url="a b")) == "--base-url 'a b': must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1"
    # `threeds run` renames two flags: the line uses the name the user typed
    run = RunConfig(rate=RateConfig(max_new_tokens=0), select=SelectConfig(quality_threshold=101.0))
    assert first_problem(run) == "--rate-max-new-tokens 0: must be at least 1"
    assert problems(run) == {"rate.max_new_tokens": "must be at least 1", "select.quality_threshold": "must be within 0-100"}


def test_band_ends_in_the_wrong_order():
    assert first_problem(SelectConfig(low_th=90.0, up_th=10.0)) == "--low-th 90: above --up-th 10; every band needs 0 <= low <= up <= 100"
    # a metric's own end against the shared one: the metric is named, once
    assert problems(SelectConfig(conf_low=80.0)) == {"conf_low": "above --up-th 75; the Response Confidence band needs 0 <= low <= up <= 100"}
    assert problems(SelectConfig(low_th=50.0, up_th=50.0)) == {}  # one percentile: a band of ties, allowed
    # the shared ends reversed but every metric has its own: nothing is wrong
    own = {f"{m}_{e}": v for m in ("ins", "conf", "corr") for e, v in (("low", 10.0), ("up", 20.0))}
    assert problems(SelectConfig(low_th=90.0, up_th=10.0, **own)) == {}


def test_rules_that_contradict_or_cannot_be_written():
    assert problems(SelectConfig(include=("a", "b"), exclude=("b",))) == {
        "exclude": "ids both included and excluded (by --include too): b"}
    assert "with a comma" in problems(SelectConfig(include=("a,b",)))["include"]
    assert "unknown A' flag 'long'" in problems(SelectConfig(exclude_flags=("long",)))["exclude_flags"]


def test_relations_wait_for_valid_fields():
    """A band end of the wrong type is named, not compared (a form may hold anything)."""
    assert problems(SelectConfig(low_th="high")) == {"low_th": "must be a number"}


@pytest.mark.parametrize("argv, line", [
    (["run", "--sample-num", "0"], "--sample-num 0: must be at least 1"),
    (["run", "--low-th", "90", "--up-th", "10"], "--low-th 90: above --up-th 10"),
    (["run", "--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["run", "--batch-size", "-1"], "--batch-size -1: must be at least 1"),
    (["run", "--timeout", "0"], "--timeout 0: must be more than 0"),
    (["run", "--limit", "2", "--sample", "3"], "--sample 3: not with --limit"),
    (["generate", "--out", "o.json", "--batch-tokens", "0"], None),  # generate has no --batch-tokens: argparse
    (["generate", "--out", "o.json", "--gen-batch-tokens", "0"], "--gen-batch-tokens 0: must be at least 1"),
    (["rate", "--out", "r.jsonl", "--reasks", "-5"], "--reasks -5: must be at least 0"),
    (["rate", "--out", "r.jsonl", "--concurrency", "0"], "--concurrency 0: must be at least 1"),
    (["score", "--out", "run", "--chunk-size", "0"], "--chunk-size 0: must be at least 1"),
    (["score", "--out", "run", "--max-length", "0"], "--max-length 0: must be at least 2"),
    (["filter", "--ratings", "r.jsonl", "--out", "o.json", "--quality-threshold", "150"], "--quality-threshold 150: must be within 0-100"),
    (["select", "--run", "run", "--out", "o.json", "--retries", "-1"], None),
    (["select", "--run", "run", "--out", "o.json", "--sample-num", "0"], "--sample-num 0: must be at least 1"),
])  # fmt: skip
def test_a_bad_flag_stops_before_the_data_is_read(argv, line, tmp_path, caplog, monkeypatch):
    """--data names a file that does not exist: the setting's line comes first, so nothing was read."""
    from threeds.cli import main

    monkeypatch.chdir(tmp_path)
    if argv[0] != "select":
        argv = [*argv, "--data", str(tmp_path / "absent.jsonl")]
    if line is None:  # a flag the command does not have: argparse's usage error
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == USAGE
        return
    caplog.clear()
    assert main(argv) == USAGE
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].startswith(line), said
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    if argv[0] == "run":  # `run` records the refusal as the run's end, for the app; nothing else is written
        assert written == ["cache/absent/.lock", "cache/absent/progress.json", "cache/absent/status.json"], written
        assert json.loads((tmp_path / "cache/absent/status.json").read_text())["error"] == said[0]
    else:
        assert written == []


def test_select_config_from_dict_reads_a_preset_a_link_and_a_recorded_selection():
    """One parser for the three places a selection comes from: JSON values, a link's text, `recorded()`."""
    want = SelectConfig(low_th=20.0, corr_up=80.0, sample_num=9, quality_threshold=70.0, include=("x", "y"),
                        exclude_flags=("repeats",))  # fmt: skip
    preset = {"low_th": 20, "corr_up": 80.0, "sample_num": 9, "quality_threshold": 70, "include": ["x", "y"],
              "exclude_flags": ["repeats"]}  # fmt: skip
    link = {"low_th": "20", "corr_up": "80", "sample_num": "9", "quality_threshold": "70", "include": "x,y",
            "exclude_flags": "repeats"}  # fmt: skip
    assert SelectConfig.from_dict(preset, "p") == SelectConfig.from_dict(link, "l") == want
    assert SelectConfig.from_dict(want.recorded(), "r").bands() == want.bands()
    assert SelectConfig.from_dict({"bands": {"ins_ppl": [10, 90]}}, "r").bands()["ins_ppl"] == (10.0, 90.0)
    assert SelectConfig.from_dict({}, "p") == SelectConfig()


@pytest.mark.parametrize("obj, message", [
    ([1], "where: expected a JSON object, got list"),
    ({"low_t": 20}, "where: unknown setting(s) ['low_t']"),
    ({"sample_num": 2.5}, "where: sample_num must be int, got 2.5"),
    ({"sample_num": True}, "where: sample_num must be int, got True"),
    ({"sample_num": "ten"}, "where: sample_num='ten' is not a valid int"),
    ({"include": [1]}, "where: include must be a list of id strings"),
    ({"exclude_flags": "hit_max,nope"}, "where: unknown A' flag 'nope'"),
    ({"low_th": 80, "up_th": 20}, "where: --low-th 80: above --up-th 20"),
    ({"sample_num": 0}, "where: --sample-num 0: must be at least 1"),
    ({"bands": {"ins_ppl": [1]}}, "where: bands must map metrics"),
    ({"bands": {"ins_ppl": [1, 2]}, "low_th": 5}, "where: bands and low_th both given"),
])  # fmt: skip
def test_select_config_from_dict_names_what_is_wrong(obj, message):
    with pytest.raises(SettingsError) as caught:
        SelectConfig.from_dict(obj, "where")
    assert str(caught.value).startswith(message)


def test_stage_part_reads_what_a_stage_recorded_and_nothing_else():
    from threeds.rundir.check import stage_part

    manifest = {"stages": {"filter": {"config": {"quality_threshold": 70}}, "rate": {"data": [1]}, "score": None}}
    assert stage_part(manifest, "filter", "config") == {"quality_threshold": 70}
    assert stage_part(manifest, "rate", "data") == stage_part(manifest, "score", "config") == {}
    assert stage_part({}, "filter", "config") == stage_part({"stages": []}, "filter", "config") == {}
