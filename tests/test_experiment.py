"""`threeds experiment` end to end on a tiny random model: two arms trained and evaluated, the files
read back, a stopped experiment resumed without redoing finished arms, arms parsed and drawn."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from synthetic_run import make_run

from threeds import cli
from threeds.errors import SettingsError
from threeds.config import EvalConfig, ModelConfig
from threeds.outcomes import experiment, report, train
from threeds.outcomes.arms import ArmError, ArmSource, parse_arm, parse_arms

SELECTED = ["s000003", "s000007", "s000001", "s000010"]


@pytest.fixture()
def run_dir(tmp_path):
    path = make_run(tmp_path / "run", n=12, n_dropped=3, tokens=False, nan_rows=0)
    (path / "selection.json").write_text(json.dumps({"selected_ids": SELECTED}))
    return path


@pytest.fixture()
def bench(tmp_path):
    path = tmp_path / "exam.jsonl"
    items = [{"id": f"q{i}", "question": f"Which treats case {i}?", "options": ["rest", "fluids", "surgery"], "answer": i % 3,
              "subject": "med" if i % 2 else "surg"} for i in range(6)]  # fmt: skip
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def argv(run_dir, bench, model, *extra):
    return ["experiment", "--run", str(run_dir), "--name", "t", "--arm", "sel=current", "--arm", "rand=random:same",
            "--bench", str(bench), "--model", str(model), "--batch-size", "2", "--grad-accum", "1", "--cutoff", "48",
            "--eval-batch-size", "4", *extra]  # fmt: skip


def test_two_arms_end_to_end_then_stopped_and_resumed(run_dir, bench, tiny_model_dir, monkeypatch):
    calls = {"train": [], "eval": [], "load": []}
    real_train, real_eval, real_load = experiment.train_arm, experiment.evaluate, train.load_model

    def counting_train(spec, records, config, out, *a, **kw):
        calls["train"].append(out.parent.name)
        return real_train(spec, records, config, out, *a, **kw)

    def eval_then_stop(model, tokenizer, bench, out, *a, **kw):
        calls["eval"].append(out.parent.name)
        if len(calls["eval"]) == 2:
            raise KeyboardInterrupt  # Stop pressed while the second arm is evaluated
        return real_eval(model, tokenizer, bench, out, *a, **kw)

    def counting_load(spec, adapter=None, dtype=None, **kw):
        calls["load"].append((adapter and Path(adapter).parent.name, dtype))
        return real_load(spec, adapter, dtype, **kw)

    monkeypatch.setattr(experiment, "train_arm", counting_train)
    monkeypatch.setattr(experiment, "evaluate", eval_then_stop)
    monkeypatch.setattr(experiment, "load_model", counting_load)
    monkeypatch.setattr(train, "load_model", counting_load)
    assert cli.main(argv(run_dir, bench, tiny_model_dir, "--dtype", "float32")) == 130
    assert calls["load"] == [(None, "float32"), (None, "float32")]  # one load per trained arm: sel is evaluated as trained
    exp = run_dir / "experiments" / "t"
    assert json.loads((exp / "status.json").read_text())["state"] == "stopped"
    units = json.loads((exp / "units.json").read_text())
    assert units["sel/seed0"]["eval"] == "done" and units["rand/seed0"]["train"] == "done"

    assert cli.main(argv(run_dir, bench, tiny_model_dir, "--dtype", "float32")) == 0  # resumed
    assert calls["train"] == ["sel", "rand"] and calls["eval"] == ["sel", "rand", "rand"]  # nothing finished was redone
    assert calls["load"][2:] == [("rand", "float32")]  # rand trained before the stop: loaded with its saved adapter
    described = json.loads((exp / "experiment.json").read_text())
    assert [(a["name"], a["spec"], a["records"]) for a in described["arms"]] == [
        ("sel", "current", {"seed0": 4}), ("rand", "random:same", {"seed0": 4})]  # fmt: skip
    assert json.loads((exp / "arms" / "sel" / "seed0" / "ids.json").read_text())["ids"] == SELECTED
    rand_ids = json.loads((exp / "arms" / "rand" / "seed0" / "ids.json").read_text())["ids"]
    assert len(rand_ids) == 4 and set(rand_ids) <= {r for r in ArmSource(run_dir).records}
    for arm in ("sel", "rand"):
        assert (exp / "arms" / arm / "seed0" / "adapter_model.safetensors").is_file()
        assert [r["step"] for r in map(json.loads, (exp / "arms" / arm / "seed0" / "loss.jsonl").read_text().splitlines())] == [1, 2]
        rows = [json.loads(line) for line in (exp / "evals" / arm / "seed0" / "items.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [f"q{i}" for i in range(6)] and all(len(r["logprobs"]) == 3 for r in rows)
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["baseline"] == "sel" and set(summary["arms"]) == {"sel", "rand"} and summary["arms"]["sel"]["n_items"] == 6
    assert json.loads((exp / "status.json").read_text())["state"] == "done"
    assert "| rand | `random:same` | 4 |" in (exp / "report.md").read_text()
    assert (exp / "report.csv").read_text().splitlines()[0].startswith("arm,spec,records,n_items,acc")
    units = json.loads((exp / "units.json").read_text())
    assert all(units[k]["train_s"] > 0 and units[k]["eval_s"] > 0 for k in ("sel/seed0", "rand/seed0"))

    # A rerun with one more arm evaluates only that one; a changed setting is refused.
    assert cli.main([*argv(run_dir, bench, tiny_model_dir, "--dtype", "float32"), "--arm", "zero=base"]) == 0
    assert calls["train"] == ["sel", "rand"] and calls["eval"][3:] == ["zero"] and calls["load"][3:] == [(None, "float32")]
    assert set(json.loads((exp / "summary.json").read_text())["arms"]) == {"sel", "rand", "zero"}
    assert cli.main([*argv(run_dir, bench, tiny_model_dir, "--dtype", "float32"), "--lr", "1e-3"]) == 1
    assert "other train" in json.loads((exp / "status.json").read_text())["error"]


def test_the_model_just_trained_scores_as_its_saved_adapter_reloaded(run_dir, bench, tiny_model_dir):
    """The runner evaluates the model it trained (no second load): the same numbers, to the bit, as
    the base model loaded again with the adapter it saved merged in."""
    from threeds.model.load import load_model
    from threeds.outcomes.benchsets import load_bench

    assert cli.main(argv(run_dir, bench, tiny_model_dir, "--dtype", "float32")) == 0
    exp = run_dir / "experiments" / "t"
    config = EvalConfig(bench=str(bench), adapter=str(exp / "arms" / "sel" / "seed0"), batch_size=4)
    model, tokenizer = load_model(str(tiny_model_dir), config.adapter, "float32")
    experiment.evaluate(model, tokenizer, load_bench(config.bench), exp / "reloaded", config, ModelConfig(model=str(tiny_model_dir)))
    base, tokenizer = load_model(str(tiny_model_dir), None, "float32")
    experiment.evaluate(base, tokenizer, load_bench(config.bench), exp / "base", dataclasses.replace(config, adapter=None))
    rows = [[json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
            for folder in (exp / "evals" / "sel" / "seed0", exp / "reloaded", exp / "base")]  # fmt: skip
    assert [r["logprobs"] for r in rows[0]] == [r["logprobs"] for r in rows[1]]
    assert [r["logprobs"] for r in rows[0]] != [r["logprobs"] for r in rows[2]]  # the training moved them


def test_arm_specs_are_parsed_and_checked():
    assert parse_arm("a=preset:tight").kind == "preset" and parse_arm("a=preset:tight").arg == "tight"
    assert parse_arm("r=random:50").arg == "50" and parse_arm("b=base").trains is False
    for bad in ("a", "a=random", "a=random:0", "a=preset", "a=best", "=current", "a b=all"):
        with pytest.raises(SettingsError):
            parse_arm(bad)
    with pytest.raises(SettingsError, match="cannot be first"):
        parse_arms(["r=random:same", "s=current"])
    with pytest.raises(SettingsError, match="twice"):
        parse_arms(["s=current", "s=all"])
    with pytest.raises(SettingsError, match="--baseline"):
        parse_arms(["s=current"], baseline="x")


def test_arm_ids_drawn_from_the_run(run_dir):
    source = ArmSource(run_dir)
    arms = parse_arms(["s=current", "r=random:same", "q=quality", "a=all", "b=base"])
    units = experiment.plan_units(source, arms, seeds=2)
    ids = {u.key: u.ids for u in units}
    assert list(ids) == ["s/seed0", "r/seed0", "q/seed0", "a/seed0", "b/seed0", "s/seed1", "r/seed1", "q/seed1", "a/seed1"]
    assert ids["s/seed0"] == SELECTED and ids["b/seed0"] is None
    assert len(ids["r/seed0"]) == 4 and ids["r/seed0"] != ids["r/seed1"]  # each seed draws its own subset
    assert ids["a/seed0"] == [f"s{i:06d}" for i in range(12)] + [f"d{i:06d}" for i in range(3)]
    assert ids["q/seed0"] == [f"s{i:06d}" for i in range(12)]  # the dropped ones are rated below 85
    with pytest.raises(ArmError, match="asked"):
        source.ids(parse_arm("r=random:100"), 0)


def test_report_rows_and_markdown():
    described = {"name": "x", "arms": [{"name": "a", "spec": "current", "records": {"seed0": 5}},
                                       {"name": "b", "spec": "base", "records": {"seed0": None}}]}  # fmt: skip
    summary = {"baseline": "a", "n_items": 10, "majority_acc": 0.3, "arms": {
        "a": {"n_items": 10, "acc": 0.5, "acc_ci": [0.2, 0.8], "delta": 0.0, "delta_ci": [0.0, 0.0], "verdict": "baseline"},
        "b": {"n_items": 10, "acc": 0.4, "acc_ci": [0.1, 0.7], "delta": -0.1, "delta_ci": [-0.3, 0.1], "mcnemar_p": 0.625,
              "p_holm": 0.625, "verdict": "no detectable difference"}}}  # fmt: skip
    rows = report.arm_rows(described, summary)
    assert [(r["arm"], r["records"], r["acc_lo"]) for r in rows] == [("a", 5, 0.2), ("b", None, 0.1)]
    text = report.markdown(described, summary)
    assert "| b | `base` | — | 40.0 (10.0–70.0) | -10.0 (-30.0 to +10.0) | 0.625 (0.625) |" in text
    assert report.csv_text(summary, described).splitlines()[2].startswith("b,base,,10,0.4,0.1,0.7")
