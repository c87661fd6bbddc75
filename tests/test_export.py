"""Export formats, the LlamaFactory entry, and the `threeds select` command that reproduces a selection."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from synthetic_run import make_run

from threeds.cli import build_parser, main
from threeds.config import SelectConfig
from threeds.rundir.read import load_run
from threeds.selection.apply import config_from_args
from threeds.selection.kcenter import band_filter
from threeds.selection.pick_order import PickOrder
from threeds.views.export import (
    dataset_info_entry,
    export_text,
    file_name,
    select_command,
)

RECORDS = [
    {"id": "a", "instruction": "Q1", "input": "ctx", "output": "A1", "source": "x"},
    {"id": "b", "instruction": "Q2", "output": "A2", "system": "be brief"},
]


def test_alpaca_and_jsonl_rows():
    rows = json.loads(export_text(RECORDS, "alpaca"))
    assert rows[0] == {"instruction": "Q1", "input": "ctx", "output": "A1", "id": "a", "source": "x"}
    assert rows[1]["input"] == ""
    lines = export_text(RECORDS, "jsonl").splitlines()
    assert [json.loads(line) for line in lines] == rows


def test_sharegpt_rows():
    rows = json.loads(export_text(RECORDS, "sharegpt"))
    assert rows[0]["conversations"] == [{"from": "human", "value": "Q1\nctx"}, {"from": "gpt", "value": "A1"}]
    assert rows[1]["system"] == "be brief"


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown export format"):
        export_text(RECORDS, "csv")


def test_dataset_info_entries():
    alpaca = dataset_info_entry("med", "alpaca")
    assert alpaca == {"med": {"file_name": "med.json", "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}
    assert dataset_info_entry("med", "jsonl")["med"]["file_name"] == "med.jsonl"
    share = dataset_info_entry("med", "sharegpt", has_system=True)["med"]
    assert share["file_name"] == file_name("med", "sharegpt") == "med_sharegpt.json"
    assert share["formatting"] == "sharegpt"
    assert share["columns"] == {"messages": "conversations", "system": "system"}
    assert share["tags"]["user_tag"] == "human" and share["tags"]["assistant_tag"] == "gpt"


@pytest.mark.parametrize(
    "bands",
    [
        {"ins_ppl": (25, 75), "gen_wloss": (25, 75), "gt_wloss": (25, 75)},
        {"ins_ppl": (10, 90), "gen_wloss": (20.5, 80), "gt_wloss": (0, 100)},
    ],
)
def test_select_command_parses_back_to_the_same_settings(bands):
    config = SelectConfig.from_bands(bands, sample_num=123, atten_method="max", seed=7)
    command = select_command("cache/my run", "out.json", config)
    argv = command.split(" ", 1)[1]
    args = build_parser().parse_args(shlex.split(argv))
    assert str(args.run) == "cache/my run" and config_from_args(args, args.run) == config
    assert config.bands() == {m: tuple(float(v) for v in b) for m, b in bands.items()}
    shared = len(set(map(tuple, bands.values()))) == 1
    assert ("--ins-low" in command) != shared and "--sample-num 123" in command and "--seed 7" in command


def test_select_command_reproduces_the_app_selection(tmp_path):
    """What the app picks (band filter + PickOrder slice) is what the printed command selects."""
    run_dir = make_run(tmp_path / "run", n=60, n_dropped=0)
    run = load_run(run_dir)
    bands = {"ins_ppl": (10, 90), "gen_wloss": (5, 95), "gt_wloss": (15, 85)}
    mask, _ = band_filter(run.metrics, bands, "mean")
    survivors = np.flatnonzero(mask)
    app_ids = run.metrics["id"].to_numpy()[survivors[PickOrder(run.embeddings[mask]).picks(9)]].tolist()
    out = tmp_path / "selected.json"
    command = select_command(str(run_dir), str(out), SelectConfig.from_bands(bands, sample_num=9))
    assert main(shlex.split(command)[1:]) == 0
    assert [r["id"] for r in json.loads(out.read_text())] == app_ids


def test_dataset_names_become_plain_file_names():
    from threeds.views.export import safe_name

    assert safe_name("../../etc/passwd") == "_.._etc_passwd"
    assert file_name("../x", "alpaca") == "_x.json" and file_name(".hidden", "jsonl") == "hidden.jsonl"
    assert file_name("a b/c\\d", "sharegpt") == "a_b_c_d_sharegpt.json"
    assert file_name("医学_数据-1.0", "alpaca") == "医学_数据-1.0.json"
    assert file_name(" ", "alpaca") == "dataset.json" and file_name("..", "alpaca") == "dataset.json"
    assert list(dataset_info_entry("x/y", "jsonl")) == ["x_y"]


def test_export_is_strict_json():
    rec = {"id": "a", "instruction": "Q", "output": "A", "score": float("nan")}
    for fmt in ("alpaca", "jsonl", "sharegpt"):
        text = export_text([rec], fmt)
        assert "NaN" not in text and '"score": null' in text
