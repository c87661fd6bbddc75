"""threeds.selection.apply: one SelectConfig applied to a run, with hand-checked numbers on tiny inputs,
presets, and the exported command reproducing the selection through the CLI."""

from __future__ import annotations

import dataclasses
import json
import shlex

import numpy as np
import pandas as pd
import pytest
from synthetic_run import flag_answers, make_run

from threeds import cli
from threeds.config import SelectConfig, to_argv
from threeds.errors import SettingsError
from threeds.selection.answer_flags import flag_answers as flags_of
from threeds.selection.answer_flags import run_answer_flags
from threeds.selection.apply import (
    SelectionError,
    apply,
    empty_reason,
    list_presets,
    load_preset,
    ordinal,
    save_preset,
    select_dir,
)
from threeds.selection.kcenter import band_filter, k_center_greedy
from threeds.views.export import select_command

IDS = ["a", "b", "c", "d", "e"]


def tiny() -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Five samples whose three metrics are 1..5; points on a line at 0, 1, 2, 10, 11."""
    v = np.arange(1.0, 6.0)
    metrics = pd.DataFrame({"id": IDS, "ins_ppl": v, "gen_wloss_mean": v, "gen_wloss_max": v, "gt_wloss_mean": v, "gt_wloss_max": v})
    emb = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]], dtype=np.float32)
    ratings = pd.DataFrame({"id": IDS, "score": [90.0, 80.0, 95.0, 60.0, 99.0]})
    return metrics, emb, ratings


def test_bands_only_hand_checked():
    metrics, emb, ratings = tiny()
    # percentiles 25 / 75 of 1..5 are 2 and 4: b, c, d inside
    chosen = apply(SelectConfig(sample_num=10), metrics, emb, ratings)
    assert list(chosen.verdict) == ["dropped", "picked", "picked", "picked", "dropped"]
    assert chosen.funnel == {"rated": 5, "kept by quality": None, "scored": 5, "A' not flagged": None, "in all bands": 3, "picked": 3}
    assert chosen.reason[0] == (
        "Instruction Understanding below the 25th percentile; Response Confidence below the 25th percentile; "
        "Response Correctness below the 25th percentile"
    )
    assert chosen.reason[4].startswith("Instruction Understanding above the 75th percentile")


def test_quality_threshold_takes_the_percentiles_over_the_kept_samples():
    metrics, emb, ratings = tiny()
    chosen = apply(SelectConfig(quality_threshold=85.0, sample_num=10), metrics, emb, ratings)
    # kept by quality: a (90), c (95), e (99) with values 1, 3, 5 -> 25th/75th percentiles 2 and 4: only c
    assert chosen.picked_ids == ["c"]
    assert chosen.funnel == {"rated": 5, "kept by quality": 3, "scored": 3, "A' not flagged": None, "in all bands": 1, "picked": 1}
    assert chosen.reason[1] == "quality 80 < 85"  # b's value 2 is inside the band
    assert chosen.reason[3] == "quality 60 < 85"
    assert chosen.reason[2] == "k-center pick #1"
    assert chosen.reason[0].startswith("Instruction Understanding below the 25th percentile")
    assert chosen.report["n_total"] == 3 and chosen.report["metrics"]["ins_ppl"]["lo"] == 2.0


def test_quality_threshold_without_ratings_is_a_clear_error():
    metrics, emb, _ = tiny()
    with pytest.raises(SelectionError, match="no ratings.jsonl"):
        apply(SelectConfig(quality_threshold=85.0), metrics, emb, None)


def test_not_picked_reason_and_rank():
    metrics, emb, ratings = tiny()
    chosen = apply(SelectConfig(low_th=0, up_th=100, sample_num=2, seed=0), metrics, emb, ratings)
    first = int(np.random.default_rng(0).integers(5))
    assert chosen.picked[0] == first and sorted(chosen.rank[chosen.rank > 0]) == [1, 2]
    others = chosen.verdict == "not picked"
    assert others.sum() == 3 and set(chosen.reason[others]) == {"in all bands; not among the 2 k-center picks"}


def test_include_rows_are_centres_before_the_greedy():
    metrics, emb, ratings = tiny()
    # centre e (11); farthest from it: a (0); then from {11, 0}: c at 2 (b and d are 1 away)
    chosen = apply(SelectConfig(low_th=0, up_th=100, sample_num=3, include=("e",)), metrics, emb, ratings)
    assert chosen.picked_ids == ["e", "a", "c"]
    assert chosen.reason[4] == "always include (rule)"
    # excluded a is never a candidate: e, then b (10 from e); c and d tie at 1, lowest index wins
    chosen = apply(SelectConfig(low_th=0, up_th=100, sample_num=3, include=("e",), exclude=("a",)), metrics, emb, ratings)
    assert chosen.picked_ids == ["e", "b", "c"] and chosen.reason[0] == "excluded by rule"


def test_include_overrides_quality_and_bands():
    metrics, emb, ratings = tiny()
    chosen = apply(SelectConfig(quality_threshold=85.0, include=("d",), sample_num=2), metrics, emb, ratings)
    assert chosen.picked_ids == ["d", "c"]
    assert chosen.reason[3] == "always include (rule) over: quality 60 < 85"


def test_unknown_rule_id_and_conflicting_rules():
    metrics, emb, ratings = tiny()
    with pytest.raises(SelectionError, match="include rule: 1 id"):
        apply(SelectConfig(include=("zz",)), metrics, emb, ratings)
    with pytest.raises(SelectionError, match="both included and excluded"):
        apply(SelectConfig(include=("a",), exclude=("a",)), metrics, emb, ratings)


def test_k_center_initial_centres_match_a_brute_force():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    picks = k_center_greedy(x, 12, initial=[7, 150])
    chosen = [7, 150]
    d = np.min(((x[:, None] - x[chosen][None]) ** 2).sum(-1), 1)
    while len(chosen) < 12:
        d[chosen] = -1
        chosen.append(int(np.argmax(d)))
        d = np.minimum(d, ((x - x[chosen[-1]]) ** 2).sum(-1))
    assert picks.tolist() == chosen


def test_ordinal():
    assert [ordinal(v) for v in (1, 2, 3, 11, 12, 22, 25, 75, 22.5)] == ["1st", "2nd", "3rd", "11th", "12th", "22nd", "25th", "75th", "22.5th"]


# ------------------------------------------------------------------------------ run directory, CLI, presets


@pytest.fixture()
def run_dir(tmp_path):
    return make_run(tmp_path / "run", n=60, n_dropped=10)


def cli_ids(argv: list[str]) -> list[str]:
    assert cli.main(argv) == 0
    return [r["id"] for r in json.loads(open(argv[argv.index("--out") + 1]).read())]


def test_default_config_is_bands_then_kcenter(run_dir, tmp_path):
    """No threshold, no rules: the paper's two steps, band filter then k-center on the survivors."""
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    survivors = np.flatnonzero(band_filter(metrics)[0])
    picks = k_center_greedy(np.load(run_dir / "embeddings.npy")[survivors], 7, seed=0)
    expected = metrics["id"].to_numpy()[survivors[picks]].tolist()
    assert select_dir(run_dir, SelectConfig(sample_num=7))["selected_ids"] == expected
    assert cli_ids(["select", "--run", str(run_dir), "--out", str(tmp_path / "o.json"), "--sample-num", "7"]) == expected


def test_exported_command_reproduces_the_selection(run_dir, tmp_path):
    config = SelectConfig(quality_threshold=92.0, conf_low=10.0, conf_up=90.0, sample_num=5, atten_method="max", seed=3, include=("s000003",), exclude=("s000010",))
    ratings = pd.DataFrame([json.loads(line) for line in open(run_dir / "ratings.jsonl")])
    ratings["score"] = pd.to_numeric(ratings["score"])
    expected = apply(config, pd.read_parquet(run_dir / "metrics.parquet"), np.load(run_dir / "embeddings.npy"), ratings).picked_ids
    line = select_command(str(run_dir), str(tmp_path / "out.json"), config)
    argv = shlex.split(line)
    assert argv[:2] == ["threeds", "select"] and "--quality-threshold" in argv and "--include" in argv
    assert cli_ids(argv[1:]) == expected and expected[0] == "s000003"
    written = json.loads((run_dir / "selection.json").read_text())
    assert written["params"]["quality_threshold"] == 92.0 and written["report"]["funnel"]["picked"] == 5


def test_cli_quality_threshold_without_ratings(run_dir, tmp_path, capsys, caplog):
    (run_dir / "ratings.jsonl").unlink()
    assert cli.main(["select", "--run", str(run_dir), "--out", str(tmp_path / "o.json"), "--quality-threshold", "90"]) == 1
    assert "ratings.jsonl: not found; --quality-threshold needs the run's Stage-1 ratings" in caplog.text


def test_preset_round_trip_and_flag_override(run_dir, tmp_path):
    config = SelectConfig(quality_threshold=90.0, low_th=10.0, sample_num=4, exclude=("s000001",))
    path = save_preset(run_dir, "narrow", config)
    assert json.loads(path.read_text())["exclude"] == ["s000001"]
    assert list_presets(run_dir) == ["narrow"] and load_preset(run_dir, "narrow") == config
    out = str(tmp_path / "o.json")
    from_preset = cli_ids(["select", "--run", str(run_dir), "--out", out, "--preset", "narrow"])
    assert from_preset == select_dir(run_dir, config)["selected_ids"]
    overridden = cli_ids(["select", "--run", str(run_dir), "--out", out, "--preset", "narrow", "--sample-num", "2"])
    assert overridden == select_dir(run_dir, dataclasses.replace(config, sample_num=2))["selected_ids"] == from_preset[:2]


def test_bad_presets_are_one_line_errors(run_dir, tmp_path, caplog):
    folder = run_dir / "selections"
    folder.mkdir()
    (folder / "nan.json").write_text('{"low_th": NaN}')
    (folder / "typo.json").write_text('{"low_t": 20}')
    (folder / "kind.json").write_text('{"sample_num": "ten"}')
    with pytest.raises(SelectionError, match="not valid JSON"):
        load_preset(run_dir, "nan")
    with pytest.raises(SelectionError, match=r"unknown setting\(s\) \['low_t'\]"):
        load_preset(run_dir, "typo")
    with pytest.raises(SelectionError, match="kind.json: sample_num='ten' is not a valid int"):
        load_preset(run_dir, "kind")
    with pytest.raises(SelectionError, match="saved ones: kind, nan, typo"):
        load_preset(run_dir, "missing")
    with pytest.raises(SettingsError, match="x: --low-th 80: above --up-th 20; every band needs 0 <= low <= up <= 100"):
        SelectConfig.from_dict({"low_th": 80.0, "up_th": 20.0}, "x")
    assert cli.main(["select", "--run", str(run_dir), "--out", str(tmp_path / "o.json"), "--preset", "typo"]) == 1
    assert "unknown setting" in caplog.text


def test_to_argv_round_trips_every_field():
    config = SelectConfig(low_th=20.5, corr_up=80.0, sample_num=9, atten_method="max", seed=2, quality_threshold=70.0, include=("x", "y"), exclude=("z",),
                          exclude_flags=("repeats", "hit_max"))  # fmt: skip
    import argparse

    from threeds.selection.apply import add_select_flags, config_from_args

    parser = argparse.ArgumentParser()
    add_select_flags(parser)
    assert config_from_args(parser.parse_args(to_argv(config)), "unused") == config


def test_sample_table_hand_checked():
    from threeds.selection.apply import filter_rows, quality_per_row, sample_table

    metrics, emb, ratings = tiny()
    config = SelectConfig(quality_threshold=85.0, sample_num=10)
    chosen = apply(config, metrics, emb, ratings)
    quality = quality_per_row(ratings, metrics["id"])
    table = sample_table(chosen, metrics, quality, filter_rows(config, metrics, quality).quality_ok)
    assert table["id"].tolist() == IDS and table["quality"].tolist() == [90, 80, 95, 60, 99]
    # percentile ranks among the kept a, c, e (values 1, 3, 5): 1 -> 33.3, 2 -> 33.3, 3 -> 66.7, 4 -> 66.7, 5 -> 100
    assert np.allclose(table["Response Confidence %"], [100 / 3, 100 / 3, 200 / 3, 200 / 3, 100])
    assert table["pick"].tolist() == [0, 0, 1, 0, 0] and table["verdict"].tolist()[2] == "picked"


def test_every_why_has_plain_words():
    """Issue 25 (6): each rule in a sample's "why" comes with what it means for the sample."""
    from threeds.selection.apply import filter_rows, quality_per_row, sample_table
    from threeds.selection.verdicts import in_plain_words

    metrics, emb, ratings = tiny()
    config = SelectConfig(quality_threshold=85.0, sample_num=10)
    chosen = apply(config, metrics, emb, ratings)
    table = sample_table(chosen, metrics, quality_per_row(ratings, metrics["id"]), filter_rows(config, metrics, quality_per_row(ratings, metrics["id"])).quality_ok)
    # a (1) lies below every band, b (quality 80) is rated out, c is picked, e (5) lies above every band
    a, b, c, e = (table.set_index("id").loc[i] for i in "abce")
    assert "Response Confidence below the 25th percentile" in a["why"]
    assert "the model already answers this confidently: little to learn from it" in a["in plain words"]
    assert b["in plain words"] == "rated below the quality threshold: a weak example"
    assert c["in plain words"] == "right difficulty, and unlike the samples picked before it"
    assert "the reference answer is far from what the model expects" in e["in plain words"]
    assert in_plain_words("in all bands; not among the 2 k-center picks").startswith("right difficulty, but")
    assert in_plain_words("always include (rule) over: quality 60 < 85") == "you chose to always include it"
    assert in_plain_words("A' repeats itself; Response Confidence: no value (x)") == (
        "the model's own answer loops, so its confidence says little; this metric could not be measured")
    whys = set(table["why"])
    assert all(in_plain_words(w) for w in whys), whys


def test_overlap_and_difference_hand_checked():
    from threeds.selection.apply import difference_table, overlap

    assert overlap(["a", "b", "c"], ["c", "d", "a"]) == {"both": ["a", "c"], "only A": ["b"], "only B": ["d"]}
    metrics, emb, ratings = tiny()
    a = apply(SelectConfig(sample_num=10), metrics, emb, ratings)  # b, c, d
    b = apply(SelectConfig(quality_threshold=85.0, sample_num=10), metrics, emb, ratings)  # c
    diff = difference_table(a, b)
    assert diff["id"].tolist() == sorted(set(a.picked_ids) - {"c"}, key=a.picked_ids.index) and set(diff["picked by"]) == {"A"}
    assert diff.set_index("id").loc["b", "B why"] == "quality 80 < 85" and diff.set_index("id").loc["d", "B pick"] == 0


# ------------------------------------------------------------------------------ flags on A'


def test_flag_rule_drops_before_the_bands_hand_checked():
    metrics, emb, ratings = tiny()
    flags = flags_of(["a", "b", "c", "d", "loop " * 12], None, None)  # e repeats itself
    config = SelectConfig(sample_num=10, exclude_flags=("repeats",))
    chosen = apply(config, metrics, emb, ratings, flags)
    # the pool is a-d (values 1..4): 25th/75th percentiles 1.75 and 3.25, so b and c are inside
    # fewer candidates than sample_num: all, in pick order (first centre default_rng(0).integers(2) = 1: c)
    assert chosen.picked_ids == ["c", "b"]
    assert chosen.funnel == {"rated": 5, "kept by quality": None, "scored": 5, "A' not flagged": 4, "in all bands": 2, "picked": 2}
    assert chosen.reason[4].startswith("A' repeats itself; ") and chosen.verdict[4] == "dropped"
    assert chosen.report["n_total"] == 4 and chosen.report["metrics"]["ins_ppl"]["lo"] == 1.75
    assert apply(SelectConfig(sample_num=10), metrics, emb, ratings, flags).funnel["A' not flagged"] is None
    with pytest.raises(SelectionError, match="excluding flagged answers needs the run's A'"):
        apply(config, metrics, emb, ratings)
    with pytest.raises(SelectionError, match="unknown A' flag 'loops'"):
        apply(SelectConfig(exclude_flags=("loops",)), metrics, emb, ratings, flags)


def test_empty_reason_names_the_step():
    metrics, emb, ratings = tiny()
    every = flags_of(["loop " * 12] * 5, None, None)
    cases = [
        (SelectConfig(quality_threshold=100.0), None, "the quality threshold 100 keeps none of the scored samples; lower it"),
        (SelectConfig(exclude_flags=("repeats",)), every, "excluding A' flagged (repeats itself) leaves none of the 5 samples kept by quality; exclude fewer flags"),
        (SelectConfig(low_th=40, up_th=45), None, "no sample lies inside all three percentile bands; widen a band"),
        (SelectConfig(low_th=50, up_th=50, exclude=("c",)), None, "no sample lies inside all three percentile bands outside the exclude rule; widen a band"),
    ]
    for config, flags, reason in cases:
        chosen = apply(config, metrics, emb, ratings, flags)
        assert chosen.funnel["picked"] == 0 and empty_reason(config, chosen.funnel) == reason
    assert empty_reason(SelectConfig(), apply(SelectConfig(), metrics, emb, ratings).funnel) is None


def test_exclude_flagged_round_trip_export_cli_preset(run_dir, tmp_path, capsys):
    """The exported command (--exclude-flagged) and a preset reproduce the app's selection."""
    flagged = flag_answers(run_dir)
    config = SelectConfig(quality_threshold=85.0, sample_num=8, exclude_flags=("hit_max", "repeats", "empty"))
    metrics, emb = pd.read_parquet(run_dir / "metrics.parquet"), np.load(run_dir / "embeddings.npy")
    from threeds.rundir.read import load_run

    run = load_run(run_dir)
    flags = run_answer_flags(run_dir, metrics, run.records, run.manifest)
    expected = apply(config, metrics, emb, run.ratings, flags)
    line = select_command(str(run_dir), str(tmp_path / "out.json"), config)
    assert "--exclude-flagged hit_max,repeats,empty" in line
    ids = cli_ids(shlex.split(line)[1:])
    assert ids == expected.picked_ids and len(ids) == 8
    assert not set(ids) & {i for group in flagged.values() for i in group}
    written = json.loads((run_dir / "selection.json").read_text())
    assert written["params"]["exclude_flags"] == ["hit_max", "repeats", "empty"]
    assert written["report"]["funnel"]["A' not flagged"] == expected.funnel["A' not flagged"] == expected.funnel["scored"] - 5
    assert written["report"]["n_total"] == 55  # the bands' percentiles are taken over the unflagged samples
    select_dir(run_dir, dataclasses.replace(config, exclude_flags=()))
    assert json.loads((run_dir / "selection.json").read_text())["report"]["n_total"] == 60
    save_preset(run_dir, "clean", config)
    assert json.loads((run_dir / "selections" / "clean.json").read_text())["exclude_flags"] == ["hit_max", "repeats", "empty"]
    assert load_preset(run_dir, "clean") == config
    assert cli_ids(["select", "--run", str(run_dir), "--out", str(tmp_path / "p.json"), "--preset", "clean"]) == ids
    with pytest.raises(SystemExit) as exited:  # argparse: a usage error
        cli.main(["select", "--run", str(run_dir), "--out", str(tmp_path / "x.json"), "--exclude-flagged", "loops"])
    assert exited.value.code == 2 and "--exclude-flagged: unknown A' flag 'loops'" in capsys.readouterr().err


def test_reasons_of_many_rows_share_their_strings_and_name_each_failed_score():
    """Rows dropped by the same stages share one string object (a 1.9M-row run holds a few hundred
    texts, not 1.9M); a failed quality threshold names the row's own score, in stage order."""
    rng = np.random.default_rng(3)
    n = 4000
    v = {c: rng.normal(size=n) for c in ("ins_ppl", "gen_wloss_mean", "gen_wloss_max", "gt_wloss_mean", "gt_wloss_max")}
    v["ins_ppl"][:7] = np.nan
    ids = [f"s{i}" for i in range(n)]
    ratings = pd.DataFrame({"id": ids, "score": rng.integers(80, 100, n).astype(float)})
    chosen = apply(SelectConfig(quality_threshold=85.0, sample_num=5, exclude=("s9",)), pd.DataFrame({"id": ids, **v}), rng.normal(size=(n, 2)), ratings)
    report = chosen.report["metrics"]
    for row in range(n):
        score, ins = ratings["score"][row], v["ins_ppl"][row]
        want = ["excluded by rule"] if row == 9 else []
        want += [f"quality {score:g} < 85"] if score < 85 else []
        want += ["Instruction Understanding: no value (no prompt token to score)"] if np.isnan(ins) else []
        for metric, name in (("ins_ppl", "Instruction Understanding"), ("gen_wloss", "Response Confidence"), ("gt_wloss", "Response Correctness")):
            value = v[metric if metric == "ins_ppl" else f"{metric}_mean"][row]
            want += [f"{name} below the 25th percentile"] if value < report[metric]["lo"] else []
            want += [f"{name} above the 75th percentile"] if value > report[metric]["hi"] else []
        if want:
            assert chosen.reason[row] == "; ".join(want), row
    dropped = (chosen.verdict == "dropped") & (ratings["score"].to_numpy() >= 85)
    assert len({id(text) for text in chosen.reason[dropped]}) == len(set(chosen.reason[dropped])) < 100
    assert len({id(text) for text in chosen.verdict}) == len(set(chosen.verdict)) == 3


def test_quality_per_row_takes_each_ids_last_rating():
    from threeds.selection.apply import quality_per_row

    ratings = pd.DataFrame({"id": ["a", "b", "a", "c", "b"], "score": [1.0, 2.0, 3.0, np.nan, 5.0]})
    got = quality_per_row(ratings, pd.Series(["a", "c", "d", "b"]))
    assert np.array_equal(got, [3.0, np.nan, np.nan, 5.0], equal_nan=True)  # a re-rated: 3; c unscored; d unrated
    assert np.isnan(quality_per_row(ratings.iloc[:0], ["a"])).all() and quality_per_row(None, ["a"]) is None
