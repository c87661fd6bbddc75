"""`threeds experiment` end to end on a tiny random model: two arms trained and evaluated, the files
read back, a stopped experiment resumed without redoing finished arms, arms parsed and drawn."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from synthetic_run import make_run

from threeds import cli
from threeds.errors import SettingsError
from threeds.config import EvalConfig, ModelConfig
from threeds.outcomes import experiment, report, train
from threeds.outcomes.arms import (
    ArmError,
    ArmSource,
    default_baseline,
    length_matched,
    parse_arm,
    parse_arms,
)

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
    assert summary["baseline"] == "rand" and set(summary["arms"]) == {"sel", "rand"} and summary["arms"]["sel"]["n_items"] == 6
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
    assert default_baseline(arms) == "r" and default_baseline(parse_arms(["s=current", "b=base"])) == "s"


def test_random_length_arm_follows_the_first_arms_lengths(run_dir):
    source = ArmSource(run_dir)
    units = {u.key: u.ids for u in experiment.plan_units(source, parse_arms(["s=current", "L=random:length"]), seeds=2)}
    lengths = dict(zip(source.records, source.response_lengths().tolist(), strict=True))
    assert sorted(lengths[i] for i in units["L/seed0"]) == sorted(lengths[i] for i in SELECTED)  # 4 records, 4 strata
    assert units["L/seed0"] == experiment.plan_units(source, parse_arms(["s=current", "L=random:length"]), 1)[1].ids
    with pytest.raises(SettingsError, match="cannot be first"):
        parse_arms(["L=random:length", "s=current"])


def test_length_matched_draw_by_hand():
    pool = [f"r{i}" for i in range(1000)]
    lengths = np.arange(1000) % 100  # ten records of every length 0..99
    target = [90, 91, 92, 93, 94, 95, 96, 97, 98, 99] * 3 + [10, 10]  # long answers, and two short ones
    picked = length_matched(pool, lengths, target, seed=0, bins=4)
    got = sorted(int(lengths[int(i[1:])]) for i in picked)
    assert len(picked) == len(set(picked)) == 32
    # strata at the target's quartiles (edges 10, 92, 95, 97.25, 99): [10, 92) gets the two short and 3 x 90, 91
    edges = np.quantile(target, [0, 0.25, 0.5, 0.75, 1])
    strata = np.searchsorted(edges[1:-1], got, side="right")
    assert np.bincount(strata).tolist() == np.bincount(np.searchsorted(edges[1:-1], target, side="right")).tolist()
    assert min(got) >= 10 and max(got) <= 99  # never outside the target's range
    assert picked == length_matched(pool, lengths, target, seed=0, bins=4) != length_matched(pool, lengths, target, seed=1, bins=4)
    # a stratum short of records takes them all and borrows the rest from the nearest strata
    # (lengths 0..99 once; strata [50, 98.5) and [98.5, 99]: the upper one has a single record, 99)
    few = sorted(int(lengths[int(i[1:])]) for i in length_matched(pool[:100], lengths[:100], [50, 60, 70, 98, 99, 99, 99, 99], 0, 2))
    assert len(few) == 8 and few[-1] == 99 and few[-2] < 99 and few[0] >= 50
    with pytest.raises(ArmError, match="within the first arm's length range"):
        length_matched(pool[:5], lengths[:5], [3, 4, 4, 4, 4, 4], seed=0)


def test_report_rows_and_markdown():
    described = {"name": "x", "arms": [{"name": "a", "spec": "current", "records": {"seed0": 5}},
                                       {"name": "b", "spec": "base", "records": {"seed0": None}}]}  # fmt: skip
    summary = {"baseline": "a", "n_items": 10, "majority_acc": 0.3, "arms": {
        "a": {"n_items": 10, "acc": 0.5, "acc_ci": [0.2, 0.8], "delta": 0.0, "delta_ci": [0.0, 0.0], "verdict": "baseline"},
        "b": {"n_items": 10, "acc": 0.4, "acc_ci": [0.1, 0.7], "delta": -0.1, "delta_ci": [-0.3, 0.1], "mcnemar_p": 0.625,
              "p_holm": 0.625, "differ": "3 of 10 items differ", "verdict": "no detectable difference"}}}  # fmt: skip
    rows = report.arm_rows(described, summary)
    assert [(r["arm"], r["records"], r["acc_lo"]) for r in rows] == [("a", 5, 0.2), ("b", None, 0.1)]
    text = report.markdown(described, summary)
    assert "| b | `base` | — | 40.0 (10.0–70.0) | -10.0 (-30.0 to +10.0) | 3 of 10 items differ | 0.625 (0.625) |" in text
    assert report.csv_text(summary, described).splitlines()[2].startswith("b,base,,10,0.4,0.1,0.7")


def test_disagreement_rows_say_seeds_and_margin():
    def row(item, pred, logprobs, correct):
        return {"id": item, "subject": "s", "gold": 0, "pred": pred, "correct": correct, "logprobs": logprobs}

    half = [math.log(0.5021), math.log(0.4979), math.log(1e-9)]  # 50.21% vs 49.79%: a coin toss, not "100% right"
    evals = {"sel": [[row("q1", 0, half, True), row("q2", 1, [0.0, 0.0, -50.0], False)]],
             "rand": [[row("q1", 1, half[::-1][1:] + [half[2]], False), row("q2", 1, [0.0, 0.0, -50.0], False)]]}  # fmt: skip
    rows = report.disagreements(evals)
    assert [r["id"] for r in rows] == ["q1"]  # q2: both answered B
    assert rows[0]["sel"] == "A: 50.2% vs 49.8% for B (1 of 1 seeds right)"
    assert rows[0]["rand"] == "B: 50.2% vs 49.8% for A (0 of 1 seeds right)"
    three = {"sel": [[row("q1", 0, half, c)] for c in (True, False, True)], "rand": [[row("q1", 2, [-9.0, -9.0, 0.0], False)]] * 3}
    assert report.disagreements(three)[0]["sel"].endswith("(2 of 3 seeds right)")


def test_report_says_what_n_can_call_and_plans():
    summary = {"baseline": "a", "n_items": 100, "comparisons": 2, "min_callable": 0.07,
               "plan": {"delta": 0.05, "discordant_share": 0.2, "power": 0.8, "alpha": 0.025, "n_items": 758}, "arms": {}}  # fmt: skip
    said = report.caveats({"arms": [], "model": {"model": "x"}}, summary)
    assert "No difference under 7.0 points can be called with 100 items (exact McNemar test, Holm over 2 comparisons)." in said
    assert report.planning_text(summary).startswith("Planning: to detect a true 5-point difference 80% of the time (5% level, "
                                                    "Holm over 2 comparisons) takes about 758 items if 20% of the items")  # fmt: skip


def test_a_preset_arm_is_recorded_and_a_changed_preset_refused(run_dir, tmp_path):
    from threeds.config import ExperimentConfig, SelectConfig, TrainConfig
    from threeds.selection.apply import config_to_json, save_preset

    save_preset(run_dir, "tight", SelectConfig(low_th=0.0, up_th=100.0, sample_num=3))
    source = ArmSource(run_dir)
    arms = parse_arms(["p=preset:tight", "r=random:same"])
    units = experiment.plan_units(source, arms, 1)
    config = ExperimentConfig(name="x", arm=("p=preset:tight", "r=random:same"))
    described = experiment.describe_experiment(config, TrainConfig(), arms, units, run_dir, ModelConfig())
    assert described["arms"][0]["selection"] == config_to_json(SelectConfig(low_th=0.0, up_th=100.0, sample_num=3)) and "selection" not in described["arms"][1]
    assert described["baseline"] == "r" and described["prompt_format"] == "chat" and len(units[0].ids) == 3
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "experiment.json").write_text(json.dumps(described))
    experiment.check_rerun(exp, dict(described))  # the same settings: a rerun
    save_preset(run_dir, "tight", SelectConfig(low_th=0.0, up_th=100.0, sample_num=4))
    changed = experiment.describe_experiment(config, TrainConfig(), arms, units, run_dir, ModelConfig())
    with pytest.raises(experiment.ExperimentError, match="the preset's settings changed"):
        experiment.check_rerun(exp, changed)
    older = {k: v for k, v in described.items() if k != "prompt_format"}  # an experiment.json from before the setting
    (exp / "experiment.json").write_text(json.dumps(older))
    experiment.check_rerun(exp, dict(described))
