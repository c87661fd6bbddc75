"""Hostile inputs: the CLI on bad files and corrupted run directories.

Every case must end with the documented exit status and exactly one error line that names the
file (and the line, row or field where there is one), never a traceback, and must leave the run's
files as they were (nothing lost, nothing half written). Every case runs through `threeds.cli.main`
in this process (a fresh interpreter costs seconds of imports); a few also run black box, as
`python -m threeds`, to check what really reaches stderr.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_run import make_run

from threeds.errors import BAD_INPUT, IO_ERROR, USAGE
from threeds.rundir import layout

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"instruction": "What helps a fever?", "output": "Rest and fluids.", "generated_output": "Rest."}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def scored_run(tmp: Path) -> Path:
    return make_run(tmp / "run", n=30, n_dropped=0)


def select(run: Path, out: Path, *flags: str) -> list[str]:
    return ["select", "--run", str(run), "--out", str(out), "--sample-num", "5", *flags]


def score(tmp: Path, data: Path, model: Path) -> list[str]:
    return ["score", "--data", str(data), "--out", str(tmp / "run"), "--model", str(model)]


# --------------------------------------------------------------------------------- the corpus


@dataclass
class Case:
    name: str
    build: Callable[[Path, Path], tuple[list[str], list[str]]]  # (tmp, model) -> (argv, words the line must hold)
    code: int
    writes: tuple[str, ...] = ()  # files it may write before it fails (complete ones)


def _missing_run(tmp, model):
    return select(tmp / "nope", tmp / "o.json"), [str(tmp / "nope"), "no such run directory"]


def _corrupt_metrics(tmp, model):
    run = scored_run(tmp)
    (run / "metrics.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    return select(run, tmp / "o.json"), [str(run / "metrics.parquet"), "cannot read Parquet"]


def _truncated_embeddings(tmp, model):
    run = scored_run(tmp)
    data = (run / "embeddings.npy").read_bytes()
    (run / "embeddings.npy").write_bytes(data[: len(data) // 2])
    return select(run, tmp / "o.json"), [str(run / "embeddings.npy"), "not a readable .npy"]


def _int_embeddings(tmp, model):
    run = scored_run(tmp)
    np.save(run / "embeddings.npy", np.zeros((30, 4), np.int64))
    return select(run, tmp / "o.json"), [str(run / "embeddings.npy"), "dtype int64"]


def _nan_embeddings(tmp, model):
    run = scored_run(tmp)
    emb = np.load(run / "embeddings.npy")
    emb[:] = np.nan  # every row, so k-center meets one whatever the bands keep
    np.save(run / "embeddings.npy", emb)
    return select(run, tmp / "o.json", "--low-th", "0", "--up-th", "100"), [str(run / "embeddings.npy"), "NaN/inf", "score again"]


def _repeated_id_in_metrics(tmp, model):
    run = scored_run(tmp)
    metrics = pd.read_parquet(run / "metrics.parquet")
    metrics.loc[7, "id"] = metrics.loc[2, "id"]
    metrics.to_parquet(run / "metrics.parquet", index=False)
    return select(run, tmp / "o.json"), [str(run / "metrics.parquet"), "row 7: duplicate id 's000002' (first at row 2)"]


def _repeated_id_in_data(tmp, model):
    run = scored_run(tmp)
    lines = (run / "data.jsonl").read_text().splitlines()
    lines[4] = lines[1]
    (run / "data.jsonl").write_text("\n".join(lines) + "\n")
    return select(run, tmp / "o.json"), [str(run / "data.jsonl"), "line 5: duplicate id 's000001' (first at line 2)"]


def _data_out_of_order(tmp, model):
    run = scored_run(tmp)
    lines = (run / "data.jsonl").read_text().splitlines()
    lines[3], lines[4] = lines[4], lines[3]
    (run / "data.jsonl").write_text("\n".join(lines) + "\n")
    return select(run, tmp / "o.json"), [str(run / "data.jsonl"), "do not match metrics.parquet", "row 3"]


def _stray_token_ids(tmp, model):
    run = scored_run(tmp)
    tokens = pd.read_parquet(run / "tokens.parquet")
    tokens.loc[0, "id"] = "ghost"
    tokens.to_parquet(run / "tokens.parquet", index=False)
    return select(run, tmp / "o.json"), [str(run / "tokens.parquet"), "'ghost'"]


def _missing_metric_column(tmp, model):
    run = scored_run(tmp)
    pd.read_parquet(run / "metrics.parquet").drop(columns=["gen_wloss_mean"]).to_parquet(run / "metrics.parquet")
    return select(run, tmp / "o.json"), [str(run / "metrics.parquet"), "missing columns ['gen_wloss_mean']"]


def _out_is_a_directory(tmp, model):
    (tmp / "o.json").mkdir()
    return select(scored_run(tmp), tmp / "o.json"), [str(tmp / "o.json"), "is a directory"]


def _out_under_a_file(tmp, model):
    (tmp / "file").write_text("x")
    return select(scored_run(tmp), tmp / "file" / "o.json"), [str(tmp / "file"), "not a directory"]


def _bad_band(tmp, model):
    return select(scored_run(tmp), tmp / "o.json", "--low-th", "90", "--up-th", "10"), ["--low-th 90", "--up-th 10"]


def _manifest_wrong_shape(tmp, model):
    (tmp / "run").mkdir()
    (tmp / "run" / "manifest.json").write_text("[1, 2]")
    return score(tmp, jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD}]), model), [str(tmp / "run" / "manifest.json"), "got list"]


def _manifest_section_wrong_shape(tmp, model):
    (tmp / "run").mkdir()
    (tmp / "run" / "manifest.json").write_text('{"stages": "rate"}')
    return score(tmp, jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD}]), model), [str(tmp / "run" / "manifest.json"), "field stages"]


def _empty_input(tmp, model):
    (tmp / "d.jsonl").write_text("")
    return score(tmp, tmp / "d.jsonl", model), [str(tmp / "d.jsonl"), "no records"]


def _all_rejected(tmp, model):
    data = jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD, "output": " "}, {"id": "b", **GOOD, "instruction": None}])
    return score(tmp, data, model), [str(data), "all 2 records were rejected", "index 0", "field output"]


def _all_lack_generated_output(tmp, model):
    data = jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD, "generated_output": ""}])
    return score(tmp, data, model), [str(data), "no record to score", "field generated_output"]


def _ragged_csv(tmp, model):
    (tmp / "d.csv").write_text("id,instruction,output,generated_output\na,Q,A,G,extra\n")
    return score(tmp, tmp / "d.csv", model), [str(tmp / "d.csv"), "line 2: 5 cells, the header has 4"]


def _invisible_instruction(tmp, model):
    data = jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD, "instruction": "\u200b \u2060\ufeff\u00a0"}])
    return score(tmp, data, model), [str(data), "field instruction", "invisible"]


def _broken_jsonl_line(tmp, model):
    data = jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD}, '{"id": "b", "instruction":'])
    (tmp / "d.jsonl").write_text((tmp / "d.jsonl").read_text() + json.dumps({"id": "c", **GOOD}) + "\n")
    return score(tmp, data, model), [str(data), "line 2"]


def _repeated_input_id(tmp, model):
    data = jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD}, {"id": "b", **GOOD}, {"id": "a", **GOOD}])
    return score(tmp, data, model), [str(data), "duplicate id 'a' at line 1 and line 3"]


def _missing_input(tmp, model):
    return score(tmp, tmp / "absent.jsonl", model), [str(tmp / "absent.jsonl"), "no such file"]


def _unsupported_input(tmp, model):
    (tmp / "d.xml").write_text("<a/>")
    return score(tmp, tmp / "d.xml", model), [str(tmp / "d.xml"), "unsupported file type"]


def _object_id(tmp, model):
    data = jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD}, {"id": {"nested": 1}, **GOOD}])
    return score(tmp, data, model), [str(data), "line 2", "field id", "got an object"]


def _bad_setting(tmp, model):
    data = jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD}])
    return [*score(tmp, data, model), "--chunk-size", "0"], ["--chunk-size 0", "at least 1"]


def model_copy(tmp: Path, model: Path, name: str = "m") -> Path:
    """A copy of the tiny model to damage."""
    shutil.copytree(model, tmp / name)
    return tmp / name


def score_one(tmp: Path, model: str | Path) -> list[str]:
    return score(tmp, jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD}]), model)


def _model_missing(tmp, model):
    return score_one(tmp, tmp / "nowhere"), [f"--model {tmp / 'nowhere'}", "no such file or directory"]


def _model_dir_empty(tmp, model):
    (tmp / "m").mkdir()
    return score_one(tmp, tmp / "m"), [str(tmp / "m"), "the directory is empty"]


def _model_config_only(tmp, model):
    (tmp / "m").mkdir()
    shutil.copy(model / "config.json", tmp / "m")
    return score_one(tmp, tmp / "m"), [f"no weights in {tmp / 'm'}", "model.safetensors"]


def _model_pickle_only(tmp, model):
    folder = model_copy(tmp, model)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # never read: refused by its name
    return score_one(tmp, folder), [str(folder), "only pytorch_model.bin", "a pickle", "never loads"]


def _model_text_gguf(tmp, model):
    (tmp / "m.gguf").write_text("not a model\n")
    return score_one(tmp, tmp / "m.gguf"), [str(tmp / "m.gguf"), "not a GGUF file"]


def _model_any_file(tmp, model):
    (tmp / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return score_one(tmp, tmp / "passwd"), [str(tmp / "passwd"), "not a GGUF file", "expected a model directory"]


def _model_device(tmp, model):
    return score_one(tmp, "/dev/null"), ["--model /dev/null", "not a regular file"]


def _model_truncated_weights(tmp, model):
    folder = model_copy(tmp, model)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    return score_one(tmp, folder), [str(folder), "cannot load the model", "header"]


def _model_bad_config(tmp, model):
    folder = model_copy(tmp, model)
    (folder / "config.json").write_text("{oops")
    return score_one(tmp, folder), [str(folder / "config.json"), "not valid JSON"]


def _model_unknown_type(tmp, model):
    folder = model_copy(tmp, model)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "nosuch"}))
    return score_one(tmp, folder), [str(folder), "cannot load the model", "nosuch"]


def _no_tokenizer(tmp, model):
    folder = model_copy(tmp, model)
    for path in folder.glob("tokenizer*"):
        path.unlink()
    return score_one(tmp, folder), [str(folder), "cannot load the tokenizer"]


def _no_chat_template(tmp, model):
    folder = model_copy(tmp, model)
    (folder / "chat_template.jinja").unlink()
    return score_one(tmp, folder), ["no chat template", "--template qwen|baichuan"]


def _failing_chat_template(tmp, model):
    folder = model_copy(tmp, model)
    (folder / "chat_template.jinja").write_text("{{ raise_exception('only one turn, please') }}")
    return score_one(tmp, folder), ["the chat template fails", "only one turn, please"]


def _fifo_input(tmp, model):
    os.mkfifo(tmp / "d.jsonl")  # reading it would block forever
    return score(tmp, tmp / "d.jsonl", model), [str(tmp / "d.jsonl"), "not a regular file (a FIFO)"]


def _device_input(tmp, model):
    (tmp / "d.jsonl").symlink_to("/dev/zero")  # reading it would never end
    return score(tmp, tmp / "d.jsonl", model), [str(tmp / "d.jsonl"), "not a regular file (a character device)"]


def _input_over_the_size_limit(tmp, model):
    data = jsonl(tmp / "d.jsonl", [{"id": str(i), **GOOD} for i in range(50)])
    return [*score(tmp, data, model), "--max-data-mb", "0.001"], [str(data), "more than the limit of 1048 bytes", "--max-data-mb"]


def _line_over_the_limit(tmp, model):
    data = jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD}, {"id": "b", **GOOD, "instruction": "x" * 3000}])
    return [*score(tmp, data, model), "--max-line-mb", "0.002"], [str(data), "line 2", "a line of 3", "more than the limit of 2097 bytes"]


def _deep_jsonl_line(tmp, model):
    data = jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD}, '{"id": "b", "x": ' + "[" * 50000 + "]" * 50000 + "}"])
    return score(tmp, data, model), [str(data), "line 2", "JSON nested 50001 levels deep, more than 64"]


def _deep_json_file(tmp, model):
    (tmp / "d.json").write_text("[" * 100000 + "]" * 100000)
    return score(tmp, tmp / "d.json", model), [str(tmp / "d.json"), "nested too deep"]


def _lone_surrogate(tmp, model):
    data = jsonl(tmp / "d.jsonl", ['{"id": "a", "instruction": "Fever\\ud800?", "output": "Rest.", "generated_output": "Rest."}'])
    return score(tmp, data, model), [str(data), "field instruction", "line 1: lone surrogate U+D800"]


def _deep_manifest(tmp, model):
    (tmp / "run").mkdir()
    (tmp / "run" / "manifest.json").write_text('{"a": ' + "[" * 50000 + "]" * 50000 + "}")
    return score_one(tmp, model), [str(tmp / "run" / "manifest.json"), "JSON nested 50001 levels deep"]


def _broken_ratings(tmp, model):
    data = jsonl(tmp / "d.jsonl", [{"id": "a", **GOOD}])
    ratings = jsonl(tmp / "r.jsonl", ['{"id": "a", "score": 90}', "{oops", '{"id": "b", "score": 1}'])
    return ["filter", "--data", str(data), "--ratings", str(ratings), "--out", str(tmp / "o.json")], [str(ratings), "line 2"]


CASES = [
    Case("missing run directory", _missing_run, BAD_INPUT),
    Case("corrupt metrics.parquet", _corrupt_metrics, BAD_INPUT),
    Case("truncated embeddings.npy", _truncated_embeddings, BAD_INPUT),
    Case("integer embeddings", _int_embeddings, BAD_INPUT),
    Case("NaN embeddings", _nan_embeddings, BAD_INPUT),
    Case("repeated id in metrics.parquet", _repeated_id_in_metrics, BAD_INPUT),
    Case("repeated id in data.jsonl", _repeated_id_in_data, BAD_INPUT),
    Case("data.jsonl out of order", _data_out_of_order, BAD_INPUT),
    Case("tokens of an unknown id", _stray_token_ids, BAD_INPUT),
    Case("metrics column missing", _missing_metric_column, BAD_INPUT),
    Case("--out is a directory", _out_is_a_directory, IO_ERROR),  # checked first: the run is left as it was
    Case("--out under a file", _out_under_a_file, IO_ERROR),
    Case("band out of order", _bad_band, USAGE),
    Case("manifest of the wrong shape", _manifest_wrong_shape, BAD_INPUT),
    Case("manifest section of the wrong shape", _manifest_section_wrong_shape, BAD_INPUT),
    Case("empty input", _empty_input, BAD_INPUT),
    Case("every record rejected", _all_rejected, BAD_INPUT),
    Case("no generated_output anywhere", _all_lack_generated_output, BAD_INPUT),
    Case("ragged CSV row", _ragged_csv, BAD_INPUT),
    Case("invisible-only instruction", _invisible_instruction, BAD_INPUT),
    Case("broken JSONL line", _broken_jsonl_line, BAD_INPUT),
    Case("repeated id in the input", _repeated_input_id, BAD_INPUT),
    Case("missing input file", _missing_input, IO_ERROR),
    Case("unsupported input type", _unsupported_input, BAD_INPUT),
    Case("broken ratings line", _broken_ratings, BAD_INPUT),
    Case("an id that is a JSON object", _object_id, BAD_INPUT),
    Case("a setting out of range", _bad_setting, USAGE),
    Case("a FIFO as input", _fifo_input, BAD_INPUT),
    Case("a link to /dev/zero as input", _device_input, BAD_INPUT),
    Case("input over the size limit", _input_over_the_size_limit, BAD_INPUT),
    Case("a line over the limit", _line_over_the_limit, BAD_INPUT),
    Case("a deeply nested JSONL line", _deep_jsonl_line, BAD_INPUT),
    Case("a deeply nested JSON file", _deep_json_file, BAD_INPUT),
    Case("a lone surrogate", _lone_surrogate, BAD_INPUT),
    Case("a deeply nested manifest.json", _deep_manifest, BAD_INPUT),
    *(Case(name, build, BAD_INPUT, writes=("run/manifest.json", "run/progress.json")) for name, build in [
        ("model: no such path", _model_missing), ("model: empty directory", _model_dir_empty),
        ("model: config.json without weights", _model_config_only), ("model: a pickle only", _model_pickle_only),
        ("model: a text file named .gguf", _model_text_gguf), ("model: any other file", _model_any_file),
        ("model: a device", _model_device), ("model: truncated weights", _model_truncated_weights),
        ("model: config.json not JSON", _model_bad_config), ("model: unknown architecture", _model_unknown_type),
        ("model: no tokenizer", _no_tokenizer), ("model: no chat template", _no_chat_template),
        ("model: a chat template that fails", _failing_chat_template),
    ]),
]


def snapshot(tmp: Path) -> dict[str, bytes]:
    """Every regular file's bytes (a FIFO or a link to a device stands as its kind, unread)."""
    return {str(p.relative_to(tmp)): p.read_bytes() if p.is_file() and not p.is_symlink() else b"<special>"
            for p in sorted(tmp.rglob("*")) if not p.is_dir()}  # fmt: skip


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "threeds", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def unchanged(tmp: Path, before: dict[str, bytes], case: Case) -> bool:
    """Nothing lost, nothing half written: the files are as they were (the lock file and data.jsonl's
    row index, a cache made from a file that was read whole, aside)."""
    after = snapshot(tmp)
    return {k: v for k, v in after.items() if not k.endswith(".lock") and Path(k).name not in layout.DATA_INDEX and k not in case.writes} == before


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_ends_in_one_line_naming_the_file(case, tmp_path, tiny_model_dir, caplog):
    from threeds.cli import main

    argv, words = case.build(tmp_path, tiny_model_dir)
    before = snapshot(tmp_path)
    caplog.clear()
    code = main(argv)  # an unexpected exception would escape here and fail the test
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in said] == ["ERROR"], [r.getMessage() for r in said]
    assert not said[0].exc_info and said[0].name == "threeds"  # no traceback without --debug
    line = said[0].getMessage()
    assert "\n" not in line and all(word in line for word in words), line
    assert code == case.code, line
    assert unchanged(tmp_path, before, case)


BLACK_BOX = ["missing run directory", "repeated id in metrics.parquet", "--out is a directory", "ragged CSV row"]


@pytest.mark.parametrize("case", [c for c in CASES if c.name in BLACK_BOX], ids=BLACK_BOX)
def test_black_box_stderr_is_one_line(case, tmp_path, tiny_model_dir):
    argv, words = case.build(tmp_path, tiny_model_dir)
    before = snapshot(tmp_path)
    result = run_cli(argv)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR threeds: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert result.returncode == case.code, result.stderr
    assert unchanged(tmp_path, before, case)


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli(["--debug", *select(tmp_path / "nope", tmp_path / "o.json")])
    assert result.returncode == BAD_INPUT
    assert "Traceback" in result.stderr and "no such run directory" in result.stderr


def test_nan_in_a_passed_through_field_is_written_as_null(tmp_path):
    data = jsonl(tmp_path / "d.jsonl", ['{"id": "a", "instruction": "Q", "output": "A", "weight": NaN, "w": [Infinity, 1]}'])
    ratings = jsonl(tmp_path / "r.jsonl", [{"id": "a", "score": 90}])
    from threeds.cli import main

    for out in (tmp_path / "o.json", tmp_path / "o.jsonl"):  # black box once, in this process once
        argv = ["filter", "--data", str(data), "--ratings", str(ratings), "--out", str(out)]
        assert (run_cli(argv).returncode if out.suffix == ".json" else main(argv)) == 0
        text = out.read_text()
        value = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {out}"))
        row = value[0] if isinstance(value, list) else value
        assert row == {"id": "a", "instruction": "Q", "output": "A", "weight": None, "w": [None, 1]}


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full"), (errno.EACCES, "permission denied")])
def test_a_full_disk_or_refused_write_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, caplog, code, words):
    from threeds.cli import main
    from threeds.io import atomic

    run = scored_run(tmp_path)
    before = snapshot(tmp_path)

    def refuse(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, "fsync", refuse)  # every file threeds replaces goes through atomic_write
    caplog.clear()
    assert main(select(run, tmp_path / "o.json")) == IO_ERROR
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"{run / 'selection.json'}: {words}" + ("; free some space and run the same command again" if code == errno.ENOSPC else "")]
    assert not (tmp_path / "o.json").exists()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == before  # no temp file, nothing half written


def test_an_empty_selection_says_so_and_exits_3(tmp_path, caplog, capsys):
    from threeds.cli import main
    from threeds.errors import RECORDS_FAILED

    run = scored_run(tmp_path)
    metrics = pd.read_parquet(run / "metrics.parquet")
    metrics["gen_wloss_mean"] = np.nan  # no sample can be inside the Response Confidence band
    metrics.to_parquet(run / "metrics.parquet", index=False)
    caplog.clear()
    assert main(select(run, tmp_path / "o.json")) == RECORDS_FAILED
    assert json.loads((tmp_path / "o.json").read_text()) == []
    assert json.loads(capsys.readouterr().out)["selected"] == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "0 samples selected: no sample lies inside all three percentile bands; widen a band"]


# ------------------------------------------------------------------------- models, cached and not


@pytest.fixture()
def no_hub(monkeypatch, tmp_path):
    """A hub that cannot be reached (a closed local port: refused at once) and an empty local cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hf-cache"


def test_a_hub_id_without_network_fails_at_once(no_hub, tmp_path, caplog):
    import time

    from threeds.cli import main

    started = time.monotonic()
    assert main(score_one(tmp_path, "some-org/some-model")) == BAD_INPUT
    seconds = time.monotonic() - started
    line = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][0]
    assert "no network to fetch hub id some-org/some-model" in line and "pass a local directory" in line, line
    assert seconds < 20, seconds  # transformers' own retries took 31 s


def test_hf_hub_offline_is_honoured_without_a_request(no_hub, tmp_path, monkeypatch):
    from threeds.model.files import ModelError
    from threeds.model.load import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda *a, **k: pytest.fail("a request was made"))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_model("some-org/some-model")


def test_a_hub_id_in_the_local_cache_loads_from_there(no_hub, tiny_model_dir, monkeypatch):
    """The snapshot folder is used as a local directory: no request is made."""
    from threeds.model.load import resolve_model

    snapshot = no_hub / "models--some-org--some-model" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (no_hub / "models--some-org--some-model" / "refs").mkdir()
    (no_hub / "models--some-org--some-model" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda *a, **k: pytest.fail("a request was made"))
    assert resolve_model("some-org/some-model") == str(snapshot)


def test_pos_without_a_trained_pipeline_is_one_line(tmp_path, tiny_model_dir, caplog, monkeypatch):
    from threeds.cli import main
    from threeds.model import function_words

    monkeypatch.setattr(function_words, "installed_pipeline", lambda lang: None)
    assert main([*score_one(tmp_path, tiny_model_dir), "--function-words", "pos"]) == BAD_INPUT
    line = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][0]
    assert "needs a trained spaCy pipeline" in line and "lexical" in line, line


def test_run_records_the_models_one_line_in_status_json(tmp_path, caplog):
    from threeds.cli import main

    (tmp_path / "m").mkdir()
    data = jsonl(tmp_path / "d.jsonl", [{"id": "a", **GOOD}])
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--model", str(tmp_path / "m")]) == BAD_INPUT
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    line = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][0]
    assert status["state"] == "failed" and status["error"] == line, status
    assert line == f"--model {tmp_path / 'm'}: the directory is empty; expected config.json and model.safetensors"


def test_the_app_loads_a_run_whose_data_links_to_a_device_at_once(tmp_path):
    """Loading a run in the app reads its files with the same bounds: a data.jsonl that is a link to
    /dev/zero is named as the run's error at once, without reading from it."""
    import resource
    import time

    from threeds.rundir.read import load_run

    run = scored_run(tmp_path)
    (run / "data.jsonl").unlink()
    (run / "data.jsonl").symlink_to("/dev/zero")
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    loaded = load_run(run)
    assert time.monotonic() - started < 60 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB
    assert any("not a regular file (a character device)" in message for message in loaded.errors.values()), loaded.errors


# ------------------------------------------------------------------------------------- files


def test_a_refused_out_names_the_target_and_leaves_the_run_untouched(tmp_path, monkeypatch, caplog):
    """A read-only --out folder (simulated: the tests may run as root, whom chmod does not stop)."""
    from threeds.cli import main
    from threeds.io import atomic

    run = scored_run(tmp_path)
    main(select(run, tmp_path / "first.json"))  # a selection.json to keep
    (tmp_path / "ro").mkdir()
    before = snapshot(tmp_path)
    real = atomic.tempfile.mkstemp

    def refuse(dir=None, prefix="", suffix=""):
        if Path(dir) == tmp_path / "ro":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(dir) / f"{prefix}x1y2{suffix}"))
        return real(dir=dir, prefix=prefix, suffix=suffix)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    caplog.clear()
    assert main(select(run, tmp_path / "ro" / "o.json", "--sample-num", "3")) == IO_ERROR
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [f"{tmp_path / 'ro' / 'o.json'}: permission denied"]
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")}  # selection.json as it was


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    from threeds.io.data import write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode


def test_a_full_disk_while_appending_a_log_names_the_log(tmp_path, monkeypatch):
    from threeds.errors import describe
    from threeds.io import data

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data.os, "fsync", full)
    with pytest.raises(OSError) as caught:
        data.append_jsonl(tmp_path / "generations.jsonl", [{"id": "a"}])
    assert describe(caught.value) == (f"{tmp_path / 'generations.jsonl'}: disk full; free some space and run the same "
                                      "command again", IO_ERROR)  # fmt: skip
