"""LoRA training (`threeds.outcomes.train`) on a tiny random Llama: the masked loss against a hand
computation, determinism for a seed, resume after a kill, the files written."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import make_records, tiny_llama
from safetensors.torch import load_file

from threeds.config import TrainConfig
from threeds.errors import SettingsError
from threeds.model.prompts import prompt_format
from threeds.outcomes import train
from threeds.outcomes.train import (
    TrainError,
    encode_examples,
    learning_rate,
    step_plan,
    train_lora,
)

SMALL = TrainConfig(batch_size=2, grad_accum=2, lr=1e-2, epochs=2, cutoff=64, save_steps=1)


def run(tokenizer, records, out, config=SMALL, **kw):
    return train_lora(tiny_llama(len(tokenizer)), tokenizer, prompt_format(tokenizer), records, config, out, **kw).summary


def test_first_step_loss_is_the_mean_nll_of_the_response_tokens_only(tokenizer, tmp_path):
    """LoRA's B starts at zero, so step 1's loss is the base model's: computed here by hand from the
    full logits over the response tokens of the step's records, prompts and padding left out."""
    records = make_records(3)
    config = TrainConfig(batch_size=2, grad_accum=2, cutoff=64, epochs=1)
    run(tokenizer, records, tmp_path, config)
    examples = encode_examples(records, tokenizer, prompt_format(tokenizer), 64)
    model = tiny_llama(len(tokenizer))
    nll, count = 0.0, 0
    for i in step_plan(3, config)[0]:  # 3 records, 4 per step: one step of all three
        ex = examples[i]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ex.ids])).logits[0].double(), -1)
        for t in range(ex.n_prompt, len(ex.ids)):
            nll -= float(logp[t - 1, ex.ids[t]])
            count += 1
    rows = train.loss_rows(tmp_path)
    assert len(rows) == 1 and rows[0]["tokens"] == count
    assert rows[0]["loss"] == pytest.approx(nll / count, rel=1e-5)
    prompt_tokens = sum(e.n_prompt for e in examples)
    assert count < sum(len(e.ids) for e in examples) - prompt_tokens + 1  # the prompt was masked


def test_the_prompt_ends_where_the_assistant_turn_starts(tokenizer):
    (ex,) = encode_examples([{"id": "a", "instruction": "Why?", "output": "Because."}], tokenizer, prompt_format(tokenizer), 1024)
    assert tokenizer.decode(ex.ids[ex.n_prompt :]) == "Because.<|im_end|>"
    assert tokenizer.decode(ex.ids[: ex.n_prompt]).endswith("<|im_start|>assistant\n")


def test_same_seed_same_loss_log_and_adapter_and_files(tokenizer, tmp_path):
    records = make_records(7)
    first = run(tokenizer, records, tmp_path / "a")
    run(tokenizer, records, tmp_path / "b")
    rows = train.loss_rows(tmp_path / "a")
    assert rows == train.loss_rows(tmp_path / "b")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["epoch"] for r in rows] == [1, 1, 2, 2]  # 7 records, 4 a step
    assert rows[-1]["loss"] < rows[0]["loss"]  # lr 1e-2 on the same records twice: it learns
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = json.loads((tmp_path / "a" / "ids.json").read_text())
    assert ids["seed"] == 0 and ids["ids"] == [f"r{i}" for i in range(7)]
    assert sorted(ids["order"]) == ids["ids"] and ids["order"] != ids["ids"] and ids["epochs"] == 2  # the first epoch's shuffle
    plan = step_plan(7, SMALL)
    assert ids["order"] == [f"r{i}" for step in range(2) for i in plan[step]] and sorted(plan[2] + plan[3]) == list(range(7))
    assert first["finished"] and first["steps"] == 4 and not list((tmp_path / "a").glob("checkpoint*"))
    other = run(tokenizer, records, tmp_path / "c", TrainConfig(**{**SMALL.__dict__, "seed": 1}))
    assert train.loss_rows(tmp_path / "c") != rows and other["steps"] == 4


def test_a_killed_training_resumes_from_its_checkpoint_with_the_same_numbers(tokenizer, tmp_path):
    records = make_records(7)
    run(tokenizer, records, tmp_path / "whole")

    def kill_after_three(done, total):
        if done == 3:
            with open(tmp_path / "part" / "loss.jsonl", "a") as f:
                f.write('{"step": 99, "loss": 1')  # a torn last line, as a kill leaves it
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tokenizer, records, tmp_path / "part", progress=kill_after_three)
    assert json.loads((tmp_path / "part" / "checkpoint.json").read_text())["step"] == 3
    reports = []
    summary = run(tokenizer, records, tmp_path / "part", progress=lambda *report: reports.append(report))
    assert summary["resumed_at_step"] == 3 and reports == [(3, 4), (4, 4)]  # the first report: where it resumes
    assert train.loss_rows(tmp_path / "part") == train.loss_rows(tmp_path / "whole")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("whole", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert run(tokenizer, records, tmp_path / "part") == summary  # finished: nothing is trained again


def test_other_settings_in_the_same_directory_are_refused(tokenizer, tmp_path):
    records = make_records(3)
    run(tokenizer, records, tmp_path)
    with pytest.raises(TrainError, match="other settings"):
        run(tokenizer, records[:2], tmp_path)
    with pytest.raises(SettingsError, match="--grad-accum"):
        run(tokenizer, records, tmp_path / "x", TrainConfig(grad_accum=0))


def test_cosine_schedule_and_warmup():
    config = TrainConfig(lr=1.0, warmup_ratio=0.25)
    assert [learning_rate(s, 8, config) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert learning_rate(5, 8, config) == pytest.approx(0.5 * (1 + __import__("math").cos(__import__("math").pi * 0.5)))
    assert learning_rate(3, 8, TrainConfig(lr=2.0, scheduler="constant")) == 2.0


def test_llamafactory_files(tmp_path):
    records = make_records(2)
    folder = train.write_llamafactory(tmp_path, records, TrainConfig(), "Qwen/Qwen2.5-7B", "qwen")
    info = json.loads((folder / "dataset_info.json").read_text())
    assert info["threeds_train"]["file_name"] == "threeds_train.json"
    data = json.loads((folder / "threeds_train.json").read_text())
    assert [d["instruction"] for d in data] == [r["instruction"] for r in records]
    settings = yaml.safe_load((folder / "train.yaml").read_text())
    assert {key: settings[key] for key in ("lora_rank", "learning_rate", "num_train_epochs", "template", "cutoff_len",
                                           "finetuning_type", "model_name_or_path", "bf16")} == {
        "lora_rank": 8, "learning_rate": 5e-05, "num_train_epochs": 1.0, "template": "qwen", "cutoff_len": 1024,
        "finetuning_type": "lora", "model_name_or_path": "Qwen/Qwen2.5-7B", "bf16": True}  # fmt: skip
    assert settings["dataset_dir"] == str(folder) and settings["output_dir"] == str(folder / "output")


def test_llamafactory_yaml_reads_back_paths_yaml_would_misread(tmp_path):
    """A folder or model path holding ": " or " #" (a mapping and a comment in plain YAML) reads back whole."""
    out = tmp_path / "run: 2 #trial" / "arm"
    folder = train.write_llamafactory(out, make_records(1), TrainConfig(lr=1e-4), "/models/my: model #1", None)
    text = (folder / "train.yaml").read_text()
    settings = yaml.safe_load(text)
    assert settings["model_name_or_path"] == "/models/my: model #1"
    assert settings["dataset_dir"] == str(out / "llamafactory") and settings["output_dir"] == str(out / "llamafactory" / "output")
    assert settings["template"] == "CHANGEME" and "CHANGEME to your model's" in text.splitlines()[1]
    assert settings["learning_rate"] == 1e-4 and isinstance(settings["learning_rate"], float)


def test_train_command_on_a_run_with_ids_and_errors(tmp_path, tiny_model_dir, caplog):
    from synthetic_run import make_run

    from threeds import cli

    run = make_run(tmp_path / "run", n=6, n_dropped=0, tokens=False, nan_rows=0)
    (tmp_path / "ids.txt").write_text("s000004\ns000001\n")
    out = tmp_path / "out"
    base = ["train", "--run", str(run), "--out", str(out), "--model", str(tiny_model_dir), "--batch-size", "2", "--grad-accum", "1"]
    assert cli.main([*base, "--ids", str(tmp_path / "ids.txt")]) == 0
    assert json.loads((out / "ids.json").read_text())["ids"] == ["s000004", "s000001"]
    assert json.loads((out / "train_config.json").read_text())["model"] == str(tiny_model_dir)
    assert (out / "adapter_config.json").is_file() and (out / "llamafactory" / "train.yaml").is_file()
    assert f"model_name_or_path: {tiny_model_dir}" in (out / "llamafactory" / "train.yaml").read_text()
    (tmp_path / "bad.json").write_text('["s000001", "nope"]')
    assert cli.main([*base[:4], str(tmp_path / "o2"), *base[5:], "--ids", str(tmp_path / "bad.json")]) == 1
    assert cli.main([*base[:4], str(tmp_path / "o3"), *base[5:]]) == 1  # no selection.json in the run
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "'nope'" in errors[0] and "no selection.json" in errors[1]
    assert not any(r.exc_info for r in caplog.records)  # one line each, no traceback
