"""Hostile input and faults on the outcome loop: `threeds eval`, `train`, `experiment` and their files.

No wrong number with exit 0 (a rerun whose inputs changed, a training that diverges, a NaN
log-probability), the data reader's bounds on evaluation files, settings and special files, a full
disk at a checkpoint, hand-edited experiment files, file modes. Every failure ends in one line
naming the file, item or field, with a documented exit status, and leaves finished work in place.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import resource
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_records, tiny_llama
from synthetic_run import make_experiment, make_run

from threeds import cli
from threeds.config import EvalConfig, TrainConfig
from threeds.errors import BAD_INPUT, IO_ERROR, USAGE, describe
from threeds.io.data import read_jsonl
from threeds.model.prompts import prompt_format
from threeds.outcomes import train
from threeds.outcomes.benchsets import load_bench
from threeds.outcomes.evaluate import NonFiniteError, evaluate
from threeds.outcomes.results import load_results

SELECTED = ["s000003", "s000007", "s000001", "s000010"]


def bench_rows(n: int = 6, answers: list[int] | None = None) -> list[dict]:
    answers = answers or [i % 3 for i in range(n)]
    return [{"id": f"q{i}", "question": f"Which treats case {i}?", "options": ["rest", "fluids", "surgery"],
             "answer": answers[i], "subject": "med"} for i in range(n)]  # fmt: skip


def write_bench(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def one_error(caplog) -> str:
    said = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "threeds"]
    assert [r.levelname for r in said] == ["ERROR"], [r.getMessage() for r in said]
    assert not said[0].exc_info
    line = said[0].getMessage()
    assert "\n" not in line
    return line


@pytest.fixture()
def run_dir(tmp_path):
    path = make_run(tmp_path / "run", n=12, n_dropped=3, tokens=False, nan_rows=0)
    (path / "selection.json").write_text(json.dumps({"selected_ids": SELECTED}))
    return path


def experiment_argv(run_dir, bench, model, *extra):
    return ["experiment", "--run", str(run_dir), "--name", "t", "--arm", "sel=current", "--arm", "zero=base",
            "--bench", str(bench), "--model", str(model), "--batch-size", "2", "--grad-accum", "1", "--cutoff", "48",
            "--eval-batch-size", "4", *extra]  # fmt: skip


def expected_acc(rows: list[dict], golds: dict[str, int]) -> float:
    """Accuracy by hand: the argmax of each row's stored log-probabilities against the gold given."""
    return sum(max(range(len(r["logprobs"])), key=lambda j: r["logprobs"][j]) == golds[r["id"]] for r in rows) / len(rows)


# ------------------------------------------------------------------------------ no wrong number with exit 0


def test_an_experiment_rerun_after_its_inputs_changed(run_dir, tmp_path, tiny_model_dir, caplog, monkeypatch):
    """A changed selection is refused before anything runs (the adapter was trained on the old ids); a
    changed answer key is graded again from the stored log-probabilities, with no training redone."""
    from threeds.outcomes import experiment

    bench = write_bench(tmp_path / "exam.jsonl", bench_rows())
    assert cli.main(experiment_argv(run_dir, bench, tiny_model_dir)) == 0
    exp = run_dir / "experiments" / "t"
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file() and p.suffix != ".lock"}

    (run_dir / "selection.json").write_text(json.dumps({"selected_ids": SELECTED[:3] + ["s000002"]}))
    caplog.clear()
    assert cli.main(experiment_argv(run_dir, bench, tiny_model_dir)) == BAD_INPUT
    line = one_error(caplog)
    assert "arm sel (current) seed 0 was trained on 4 records that differ from the 4" in line and str(exp) in line, line
    after = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file() and p.suffix != ".lock" and p.name != "status.json"}
    assert after == {p: v for p, v in before.items() if p.name != "status.json"}  # nothing relabelled, nothing lost

    (run_dir / "selection.json").write_text(json.dumps({"selected_ids": SELECTED}))
    golds = [2, 2, 2, 0, 0, 0]
    write_bench(bench, bench_rows(answers=golds))
    trained = []
    monkeypatch.setattr(experiment, "train_arm", lambda *a, **k: trained.append(1))
    assert cli.main(experiment_argv(run_dir, bench, tiny_model_dir)) == 0
    assert trained == []
    summary = json.loads((exp / "summary.json").read_text())
    for arm in ("sel", "zero"):
        rows = read_jsonl(exp / "evals" / arm / "seed0" / "items.jsonl")
        assert [r["gold"] for r in rows] == golds
        assert summary["arms"][arm]["acc"] == pytest.approx(expected_acc(rows, {f"q{i}": g for i, g in enumerate(golds)}))


def test_a_resumed_eval_grades_with_the_answers_as_they_are_now(tmp_path, tiny_model, tokenizer):
    path = write_bench(tmp_path / "exam.jsonl", bench_rows())
    plain = EvalConfig(bench=str(path), prompt_format="plain")
    first = evaluate(tiny_model, tokenizer, load_bench(path), tmp_path / "ev", plain)
    rows = read_jsonl(tmp_path / "ev" / "items.jsonl")
    assert first["acc"] == pytest.approx(expected_acc(rows, {f"q{i}": i % 3 for i in range(6)}))
    golds = [(i + 1) % 3 for i in range(6)]
    write_bench(path, bench_rows(answers=golds))
    calls = []
    real = tiny_model.forward
    tiny_model.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    again = evaluate(tiny_model, tokenizer, load_bench(path), tmp_path / "ev", plain)
    assert calls == []  # graded again from the stored log-probabilities, nothing scored twice
    rows = read_jsonl(tmp_path / "ev" / "items.jsonl")
    assert [r["gold"] for r in rows] == golds and all(r["correct"] == (r["pred"] == r["gold"]) for r in rows)
    assert again["acc"] == pytest.approx(expected_acc(rows, {f"q{i}": g for i, g in enumerate(golds)}))
    assert again["answer_key"] != first["answer_key"]


def test_a_training_whose_loss_goes_non_finite_stops_with_its_step(tmp_path, tokenizer, caplog):
    """A learning rate of 1e9 blows the LoRA weights up: the step whose loss or gradient is not finite
    is named, not applied, and no adapter is written; the steps before are in loss.jsonl."""
    config = TrainConfig(batch_size=2, grad_accum=1, lr=1e9, epochs=20, cutoff=48, save_steps=2, max_grad_norm=0,
                         scheduler="constant")  # fmt: skip
    model = tiny_llama(len(tokenizer))
    with pytest.raises(train.TrainError) as caught:
        train.train_lora(model, tokenizer, prompt_format(tokenizer), make_records(4), config, tmp_path / "out")
    message = str(caught.value)
    step = int(message.split("diverged at step ")[1].split(" ")[0])
    assert step >= 2  # step 1 trains from the untouched base (LoRA B starts at zero)
    assert message.startswith(f"{tmp_path / 'out'}: training diverged at step {step} of 40") and "lower --lr" in message
    rows = train.loss_rows(tmp_path / "out")
    assert [r["step"] for r in rows] == list(range(1, step)) and all(math.isfinite(r["loss"]) for r in rows)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists() and not (tmp_path / "out" / "train.json").exists()
    assert describe(caught.value) == (message, BAD_INPUT)


def test_an_evaluation_never_turns_nan_into_an_answer(tmp_path, tiny_model, tokenizer):
    with torch.no_grad():
        tiny_model.model.norm.weight.fill_(float("nan"))  # what weights that diverged give
    with pytest.raises(NonFiniteError, match="item q0: the model gave choice A a log-probability of nan"):
        path = write_bench(tmp_path / "e.jsonl", bench_rows())
        evaluate(tiny_model, tokenizer, load_bench(path), tmp_path / "ev", EvalConfig(bench=str(path), prompt_format="plain"))
    assert not (tmp_path / "ev" / "items.jsonl").exists() and not (tmp_path / "ev" / "summary.json").exists()


# ------------------------------------------------------------------------------ evaluation files


def _deep(tmp):
    return write_bench(tmp / "b.jsonl", ['{"question": ' + "[" * 100000 + "]" * 100000 + "}"]), ["line 1", "JSON nested"]


def _deep_json(tmp):
    (tmp / "b.json").write_text("[" * 100000 + "]" * 100000)
    return tmp / "b.json", ["b.json", "JSON nested"]


def _surrogate(tmp):
    return write_bench(tmp / "b.jsonl", ['{"question": "Why \\ud800?", "options": ["a", "b"], "answer": 0}']), [
        "line 1", "lone surrogate U+D800"]


def _long_line(tmp):
    row = {"question": "x" * (3 * 2**20), "options": ["a", "b"], "answer": 0}
    return write_bench(tmp / "b.jsonl", [row]), ["line 1", "longer than 1 MB"]


def _long_csv_cell(tmp):
    (tmp / "b_test.csv").write_text("q,a,b,A\n" + '"' + "x" * (3 * 2**20) + '",a,b,A\n')
    return tmp / "b_test.csv", ["b_test.csv", "row 2", "field larger than field limit"]


def _empty(tmp):
    (tmp / "b.jsonl").write_text("")
    return tmp / "b.jsonl", ["b.jsonl", "no items"]


def _fifo(tmp):
    os.mkfifo(tmp / "b.jsonl")
    return tmp / "b.jsonl", ["b.jsonl", "not a regular file (a FIFO)"]


def _big_item(tmp):
    row = {"question": "x " * 150_000, "options": ["a", "b"], "answer": 0}
    (tmp / "b.json").write_text(json.dumps([row]))
    return tmp / "b.json", ["item 1", "more than 200,000 characters"]


def _past_context(tmp):
    row = {"id": "long", "question": "fever " * 5000, "options": ["a", "b"], "answer": 0}
    return write_bench(tmp / "b.jsonl", [bench_rows(1)[0], row]), ["item long", "more than the model's context of 4,096"]


BENCH_CASES = {"deep JSON line": _deep, "deep JSON file": _deep_json, "lone surrogate": _surrogate, "a 3 MB line": _long_line,
               "a 3 MB CSV cell": _long_csv_cell, "empty file": _empty, "a FIFO": _fifo, "an item of 300,000 characters": _big_item,
               "a prompt past the model's context": _past_context}  # fmt: skip


@pytest.mark.parametrize("name", BENCH_CASES)
def test_a_hostile_evaluation_file_is_one_line(name, tmp_path, tiny_model_dir, caplog):
    path, words = BENCH_CASES[name](tmp_path)
    started, memory = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = cli.main(["eval", "--bench", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path / "ev"),
                     "--prompt-format", "plain"])  # fmt: skip
    line = one_error(caplog)
    assert code == BAD_INPUT and all(w in line for w in words), line
    assert time.monotonic() - started < 60 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - memory < 500_000  # kB
    assert not (tmp_path / "ev" / "items.jsonl").exists()


# ------------------------------------------------------------------------------ settings and special files


def test_shots_beyond_the_dev_items_are_refused_before_any_training(run_dir, tmp_path, tiny_model_dir, caplog):
    bench = write_bench(tmp_path / "exam.jsonl", bench_rows())
    assert cli.main(experiment_argv(run_dir, bench, tiny_model_dir, "--shots", "2")) == USAGE
    assert one_error(caplog).endswith("--shots 2: the set exam has only 0 dev items")
    assert not (run_dir / "experiments" / "t" / "arms").exists()


def train_argv(run, out, *extra):
    return ["train", "--run", str(run), "--out", str(out), "--batch-size", "2", "--grad-accum", "1", "--cutoff", "48", *extra]


def test_a_seed_past_64_bits_is_a_usage_error(run_dir, tmp_path, caplog):
    assert cli.main(train_argv(run_dir, tmp_path / "o", "--seed", str(2**64))) == USAGE
    assert one_error(caplog) == f"--seed {2**64}: must be within 0-{2**63 - 1}"


def test_ids_from_a_fifo_or_given_twice_are_one_line(run_dir, tmp_path, caplog):
    os.mkfifo(tmp_path / "ids.fifo")
    done = []
    worker = threading.Thread(target=lambda: done.append(cli.main(train_argv(run_dir, tmp_path / "o", "--ids", str(tmp_path / "ids.fifo")))))
    worker.start()
    worker.join(60)
    if worker.is_alive():  # it waits for a writer: let it go before failing
        with open(tmp_path / "ids.fifo", "w"):
            pass
        pytest.fail("reading --ids from a FIFO blocked")
    assert done == [BAD_INPUT] and "not a regular file (a FIFO)" in one_error(caplog)
    caplog.clear()
    (tmp_path / "ids.txt").write_text("s000001\ns000002\ns000001\n")
    assert cli.main(train_argv(run_dir, tmp_path / "o", "--ids", str(tmp_path / "ids.txt"))) == BAD_INPUT
    assert one_error(caplog) == f"{tmp_path / 'ids.txt'}: line 3: id 's000001' again (first at line 1): each record is trained on once per epoch"
    assert not (tmp_path / "o").exists()


def test_millions_of_epochs_are_planned_one_at_a_time():
    import tracemalloc

    config = TrainConfig(batch_size=2, grad_accum=2, epochs=3_000_000)
    small = TrainConfig(batch_size=2, grad_accum=2, epochs=3)
    tracemalloc.start()
    plan = train.step_plan(40, config)
    head = [plan[s] for s in range(25)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(plan) == 30_000_000 and peak < 1_000_000
    reference = train.step_plan(40, small)
    assert head == [reference[s] for s in range(25)]  # the same seeded stream, epoch after epoch
    assert sorted(i for s in range(10) for i in reference[s]) == list(range(40)) and reference[0] != reference[10]
    assert reference[3] == head[3]  # a step behind the one drawn is drawn again from the seed


# ------------------------------------------------------------------------------ a full disk at a checkpoint


def full_disk_at(monkeypatch, name: str):
    """fsync fails with ENOSPC while `name` is written (every file threeds replaces goes through atomic_write)."""
    from threeds.io import atomic

    real, state = atomic.os.fsync, {"path": None}
    real_mkstemp = atomic.tempfile.mkstemp

    def mkstemp(dir=None, prefix="", suffix=""):
        state["path"] = prefix
        return real_mkstemp(dir=dir, prefix=prefix, suffix=suffix)

    def fsync(fd):
        if state["path"] == f".{name}.":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(atomic.os, "fsync", fsync)


@pytest.mark.parametrize("command", ["train", "experiment"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_resumes(command, run_dir, tmp_path, tiny_model_dir, monkeypatch, caplog):
    bench = write_bench(tmp_path / "exam.jsonl", bench_rows())
    argv = (train_argv(run_dir, tmp_path / "o", "--model", str(tiny_model_dir), "--save-steps", "1") if command == "train"
            else experiment_argv(run_dir, bench, tiny_model_dir, "--save-steps", "1"))  # fmt: skip
    out = tmp_path / "o" if command == "train" else run_dir / "experiments" / "t" / "arms" / "sel" / "seed0"
    with monkeypatch.context() as patch:
        full_disk_at(patch, "optimizer.safetensors")
        assert cli.main(argv) == IO_ERROR
    assert one_error(caplog) == f"{out / 'checkpoint-1.tmp' / 'optimizer.safetensors'}: disk full; free some space and run the same command again"
    assert not list(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()
    if command == "experiment":
        assert json.loads((run_dir / "experiments" / "t" / "status.json").read_text())["exit_code"] == IO_ERROR
    assert cli.main(argv) == 0  # space freed: the same command finishes
    assert [r["step"] for r in read_jsonl(out / "loss.jsonl")] == [1, 2]


# ------------------------------------------------------------------------------ hand-edited experiment files


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _units_seed_text(exp):
    edit_json(exp / "units.json", lambda v: v["sel/seed0"].update(seed="0"))
    return ["units.json", "unit sel/seed0: seed: expected a whole number, got str '0'"]


def _units_not_object(exp):
    (exp / "units.json").write_text("[1, 2]")
    return ["units.json", "expected a JSON object, got list"]


def _arms_not_list(exp):
    edit_json(exp / "experiment.json", lambda v: v.update(arms="sel"))
    return ["experiment.json", "field arms: expected a list of arms, got str 'sel'"]


def _arm_records_text(exp):
    edit_json(exp / "experiment.json", lambda v: v["arms"][0].update(records={"seed0": "six"}))
    return ["experiment.json", "field arms, arm 1: records"]


def _seeds_text(exp):
    edit_json(exp / "experiment.json", lambda v: v.update(seeds="1"))
    return ["experiment.json", "field seeds"]


def _summary_acc_text(exp):
    edit_json(exp / "summary.json", lambda v: v["arms"]["sel"].update(acc="75%"))
    return ["summary.json", "field arms, arm sel: acc: expected a number or null, got str '75%'"]


def _summary_ci_short(exp):
    edit_json(exp / "summary.json", lambda v: v["arms"]["rand"].update(acc_ci=[0.1]))
    return ["summary.json", "arm rand: acc_ci"]


def _summary_truncated(exp):
    text = (exp / "summary.json").read_text()
    (exp / "summary.json").write_text(text[: len(text) // 2])
    return ["summary.json", "corrupt JSON"]


def _summary_subjects(exp):
    edit_json(exp / "summary.json", lambda v: v["arms"]["rand"].update(subjects={"other": {"n_items": 1, "acc": 0.5}}))
    return ["summary.json", "arm rand: subjects"]


def _items_row_twice(exp):
    path = exp / "evals" / "sel" / "seed0" / "items.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[2]]) + "\n")
    return ["items.jsonl", "line 9: item 'q2' again (first on line 3)"]


def edit_row(path: Path, index: int, **fields) -> None:
    rows = read_jsonl(path)
    rows[index].update(fields)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _items_gold_text(exp):
    edit_row(exp / "evals" / "rand" / "seed0" / "items.jsonl", 4, gold="A")
    return ["items.jsonl", "line 5: field gold: expected a whole number, got str 'A'"]


def _items_not_json(exp):
    (exp / "evals" / "sel" / "seed0" / "items.jsonl").write_text("{oops\n{}\n")
    return ["items.jsonl", "line 1"]


def _items_logprobs_short(exp):
    edit_row(exp / "evals" / "sel" / "seed0" / "items.jsonl", 0, logprobs=[-1.0])
    return ["items.jsonl", "line 1: field logprobs"]


def _loss_text(exp):
    (exp / "arms" / "sel" / "seed0" / "loss.jsonl").write_text('{"step": "one", "loss": 1}\n')
    return ["loss.jsonl", "line 1: field step"]


def _loss_not_object(exp):
    (exp / "arms" / "rand" / "seed0" / "loss.jsonl").write_text("[1, 2]\n")
    return ["loss.jsonl", "line 1: expected an object with step and loss"]


def _experiment_binary(exp):
    (exp / "experiment.json").write_bytes(b"\xff\xfe\x00garbage")
    return ["experiment.json", "not UTF-8"]


EXPERIMENT_FILES = {name.strip("_"): build for name, build in list(globals().items()) if name.startswith(
    ("_units", "_arms", "_arm_", "_seeds", "_summary", "_items", "_loss", "_experiment_"))}  # fmt: skip


@pytest.mark.parametrize("name", EXPERIMENT_FILES)
def test_a_hand_edited_experiment_file_is_one_line(name, tmp_path):
    from threeds.errors import ThreedsError

    exp = make_experiment(make_run(tmp_path / "run", n=12, n_dropped=0, tokens=False, nan_rows=0))
    words = EXPERIMENT_FILES[name](exp)
    with pytest.raises(ThreedsError) as caught:
        results = load_results(exp)
        results.losses(exp)
    line = str(caught.value)
    assert "\n" not in line and all(w in line for w in words), line


def test_a_duplicated_items_row_is_refused_by_the_experiment(run_dir, tmp_path, tiny_model_dir, caplog):
    bench = write_bench(tmp_path / "exam.jsonl", bench_rows())
    argv = ["experiment", "--run", str(run_dir), "--name", "t", "--arm", "zero=base", "--bench", str(bench), "--model",
            str(tiny_model_dir), "--eval-batch-size", "4"]  # fmt: skip
    assert cli.main(argv) == 0
    items = run_dir / "experiments" / "t" / "evals" / "zero" / "seed0" / "items.jsonl"
    lines = items.read_text().splitlines()
    items.write_text("\n".join([*lines, lines[0]]) + "\n")
    caplog.clear()
    assert cli.main(argv) == BAD_INPUT
    assert one_error(caplog).startswith(f"{items}: line 7: item 'q0' again (first on line 1)")


# ------------------------------------------------------------------------------ file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_adapters_checkpoints_and_model_copies_follow_the_umask(umask, mode, tmp_path, tokenizer, monkeypatch):
    from safetensors.torch import save_file

    from threeds.io.atomic import follow_umask

    old = os.umask(umask)
    try:
        seen = {}
        real = train.save_checkpoint

        def spy(out, model, optimizer, step):
            real(out, model, optimizer, step)
            seen.update({p.name: p.stat().st_mode & 0o777 for p in (out / f"checkpoint-{step}").iterdir()})
            seen["checkpoint dir"] = (out / f"checkpoint-{step}").stat().st_mode & 0o777

        monkeypatch.setattr(train, "save_checkpoint", spy)
        config = TrainConfig(batch_size=2, grad_accum=1, epochs=1, cutoff=48, save_steps=1)
        train.train_lora(tiny_llama(len(tokenizer)), tokenizer, prompt_format(tokenizer), make_records(4), config, tmp_path / "a")
        files = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir() if p.is_file()}
        assert files["adapter_model.safetensors"] == files["adapter_config.json"] == mode, files
        assert seen == {"adapter.safetensors": mode, "optimizer.safetensors": mode, "checkpoint dir": 0o777 & ~umask}
        import tempfile

        folder = Path(tempfile.mkdtemp(dir=tmp_path))  # as convert_gguf makes the model copy
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
        follow_umask(folder)
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask and (folder / "model.safetensors").stat().st_mode & 0o777 == mode
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------ adapters


def save_adapter(folder: Path, vocab: int, hidden: int = 32) -> Path:
    """A LoRA adapter as PEFT saves it, for a tiny Llama of this hidden size."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(folder)
    return folder


def _truncated_weights(folder, vocab):
    path = save_adapter(folder, vocab) / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    return ["adapter_model.safetensors", "not a readable safetensors file"]


def _config_not_json(folder, vocab):
    (save_adapter(folder, vocab) / "adapter_config.json").write_text("{oops")
    return ["adapter_config.json", "not a readable JSON file"]


def _config_not_object(folder, vocab):
    (save_adapter(folder, vocab) / "adapter_config.json").write_text("[1, 2]")
    return ["adapter_config.json", "expected a JSON object, got list"]


def _other_base(folder, vocab):
    save_adapter(folder, vocab, hidden=64)
    return ["does not fit this model", "another base model"]


def _pickle_only(folder, vocab):
    save_adapter(folder, vocab)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    return ["only adapter_model.bin, a pickle, which threeds never loads"]


def _config_without_weights(folder, vocab):
    save_adapter(folder, vocab)
    (folder / "adapter_model.safetensors").unlink()
    return ["no adapter_model.safetensors next to adapter_config.json"]


ADAPTER_CASES = {"truncated weights": _truncated_weights, "config not JSON": _config_not_json,
                 "config not an object": _config_not_object, "another base's shapes": _other_base,
                 "a pickled adapter_model.bin": _pickle_only, "a config without weights": _config_without_weights}  # fmt: skip


@pytest.mark.parametrize("name", ADAPTER_CASES)
def test_a_broken_adapter_is_one_line(name, tmp_path, tiny_model_dir, tokenizer, caplog, monkeypatch):
    """Never a traceback, never torch.load, never a request to the Hub."""
    import huggingface_hub

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("the Hub was asked"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    words = ADAPTER_CASES[name](tmp_path / "adapter", len(tokenizer))
    bench = write_bench(tmp_path / "exam.jsonl", bench_rows(2))
    code = cli.main(["eval", "--bench", str(bench), "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "ev")])  # fmt: skip
    line = one_error(caplog)
    assert code == BAD_INPUT and all(w in line for w in words), line
    assert not (tmp_path / "ev" / "items.jsonl").exists()


def test_a_good_adapter_still_loads(tmp_path, tiny_model_dir, tokenizer):
    bench = write_bench(tmp_path / "exam.jsonl", bench_rows(2))
    save_adapter(tmp_path / "adapter", len(tokenizer))
    assert cli.main(["eval", "--bench", str(bench), "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "ev")]) == 0  # fmt: skip
    assert len(read_jsonl(tmp_path / "ev" / "items.jsonl")) == 2
