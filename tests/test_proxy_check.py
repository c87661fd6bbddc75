"""The proxy check (issue 33): its statistics against hand computations and scipy / scikit-learn,
the stratified sampler's counts, the layer-cut proxy, and `threeds proxy-check` end to end on tiny
random models built from a config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_records, tiny_llama
from scipy.stats import spearmanr
from sklearn.metrics import cohen_kappa_score

from threeds.cli import main as threeds
from threeds.config import ModelConfig, ScoreConfig, SelectConfig, SettingsError, SubsetConfig, check_settings
from threeds.io.sampling import allocate, stratified_sample
from threeds.model.layer_cut import cut_model, kept_layers, save_cut
from threeds.model.load import load_model
from threeds.rundir.proxy_link import proxy_link, same_model
from threeds.selection.agreement import cohen_kappa, composition, fisher_interval, set_overlap, spearman, wilson
from threeds.selection.proxy_agreement import Gates, Side, compare, rho_sample_needed, scaled_k, verdict
from threeds.stages.pipeline import score_run

# ------------------------------------------------------------------------------ statistics


def test_spearman_matches_scipy_with_ties_and_drops_non_finite_pairs():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 50).astype(float)  # many ties
    y = x + rng.normal(0, 2, 50)
    x[3], y[7] = np.nan, np.inf
    found = spearman(x, y)
    keep = np.isfinite(x) & np.isfinite(y)
    assert found["n"] == 48
    assert found["rho"] == pytest.approx(spearmanr(x[keep], y[keep]).statistic, abs=1e-12)
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4])["rho"] is None  # a constant side ranks nothing


def test_fisher_interval_by_hand():
    # rho 0.5, n 28: z = atanh(0.5) = 0.549306, sd = sqrt((1 + 0.125) / 25) = 0.212132
    low, high = fisher_interval(0.5, 28)
    assert low == pytest.approx(math.tanh(0.549306 - 1.959964 * 0.212132), abs=1e-5)
    assert high == pytest.approx(math.tanh(0.549306 + 1.959964 * 0.212132), abs=1e-5)
    assert (round(low, 3), round(high, 3)) == (0.133, 0.747)
    assert fisher_interval(0.5, 3) is None


def test_cohen_kappa_by_hand_and_against_scikit_learn():
    a = [1, 1, 1, 0, 0, 0, 1, 0, 1, 1]
    b = [1, 1, 0, 0, 0, 1, 1, 0, 1, 0]
    found = cohen_kappa(a, b)
    # p_o = 7/10; marginals 0.6 and 0.5: p_e = 0.3 + 0.2 = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4
    assert (found["p_o"], found["p_e"], found["kappa"]) == pytest.approx((0.7, 0.5, 0.4))
    assert found["kappa"] == pytest.approx(cohen_kappa_score(a, b))
    se = math.sqrt(0.7 * 0.3 / 10) / 0.5  # 0.289828
    assert found["ci"] == pytest.approx([0.4 - 1.959964 * se, 0.4 + 1.959964 * se], abs=1e-5)
    assert cohen_kappa([1, 1], [1, 1])["kappa"] is None  # no variation: kappa undefined


def test_wilson_interval_by_hand():
    assert wilson(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 0) is None


def test_set_overlap_and_chance_by_hand():
    found = set_overlap(["a", "b", "c", "d"], ["c", "d", "e", "f"], 20)
    assert (found["both"], found["share"], found["jaccard"]) == (2, 0.5, pytest.approx(2 / 6))
    assert found["chance_share"] == pytest.approx(4 / 20) and found["vs_chance"] == pytest.approx(2.5)
    assert found["chance_jaccard"] == pytest.approx(0.8 / 7.2)  # expected 16/20 shared of 8 - 0.8
    low, high = found["share_ci"]
    assert found["jaccard_ci"] == pytest.approx([low * 4 / (8 - low * 4), high * 4 / (8 - high * 4)])


def test_composition_by_hand():
    sources = ["a", "a", "b", "b", "c", "c"]
    found = composition(sources, np.arange(6), np.array([0, 1]), np.array([0, 2]))
    rows = {r["source"]: r for r in found["rows"]}
    assert rows["a"]["target"] == 1.0 and rows["a"]["proxy"] == 0.5 and rows["b"]["shift"] == 0.5
    assert rows["c"]["sample"] == pytest.approx(1 / 3) and found["total_variation"] == pytest.approx(0.5)


def test_records_needed_puts_the_interval_at_the_gate():
    n = rho_sample_needed(0.85, 0.7)
    assert fisher_interval(0.85, n)[0] >= 0.7 > fisher_interval(0.85, n - 1)[0]
    assert rho_sample_needed(0.6, 0.7) is None


def test_scaled_k():
    assert scaled_k(5000, 2000, 1_900_000) == 5  # 5000 x 2000 / 1.9M = 5.3
    assert scaled_k(5000, 200, None) == 20 and scaled_k(5000, 200, 100) == 200 and scaled_k(10, 200, 10**9) == 1


def _side(values: np.ndarray, emb: np.ndarray) -> Side:
    n = len(values)
    metrics = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "ins_ppl": values[:, 0], "gen_wloss_mean": values[:, 1],
                            "gen_wloss_max": values[:, 1], "gt_wloss_mean": values[:, 2], "gt_wloss_max": values[:, 2]})  # fmt: skip
    return Side(metrics, emb.astype(np.float32))


def test_compare_and_verdict_pass_fail_and_inconclusive():
    rng = np.random.default_rng(1)
    values, emb = rng.normal(size=(300, 3)), rng.normal(size=(300, 8))
    sources = ["x" if i % 3 else "y" for i in range(300)]
    same = compare(_side(values, emb), _side(values, emb), SelectConfig(), 30, sources)
    assert all(same["metrics"][m]["spearman"]["rho"] == pytest.approx(1.0) for m in same["metrics"])
    assert same["intersection"]["band_kappa"]["kappa"] == pytest.approx(1.0) and same["picks"]["overlap"]["share"] == 1.0
    assert same["kcenter_order"]["rho"] == pytest.approx(1.0)
    assert verdict(same)["verdict"] == "passes" and "equivalen" not in verdict(same)["words"].replace("not equivalence", "")
    noisy = _side(values + rng.normal(0, 3, values.shape), rng.normal(size=(300, 8)))
    other = compare(_side(values, emb), noisy, SelectConfig(), 30, sources)
    decided = verdict(other)
    assert decided["verdict"] == "fails" and not decided["passed"]
    assert [r["estimate_passes"] for r in decided["checks"][:3]] == [False] * 3
    # 40 records that agree well but not perfectly: the estimates pass, the intervals cannot show it
    close = values[:40] + rng.normal(0, 0.7, (40, 3))  # at n = 40 each rho's interval is +-0.1 or more
    few = compare(_side(values[:40], emb[:40]), _side(close, emb[:40]), SelectConfig(), 10, sources[:40])
    gate = min(few["metrics"][m]["spearman"]["rho"] for m in few["metrics"]) - 0.05  # each estimate passes it
    few["picks"]["overlap"] = set_overlap(list("abcdef"), list("abcdxy"), 40)  # 4 of 6: 4.4x chance (6/40), low end 1.9x
    decided = verdict(few, Gates(min_rho=gate, min_vs_chance=3))
    assert decided["verdict"] == "inconclusive", decided
    assert all(r["estimate_passes"] for r in decided["checks"]) and not all(r["interval_passes"] for r in decided["checks"])
    assert "records would show" in decided["words"]
    assert verdict(compare(_side(values[:10], emb[:10]), _side(values[:10], emb[:10]), SelectConfig(), 2, sources[:10]))[
        "verdict"] == "inconclusive"  # fmt: skip


# ------------------------------------------------------------------------------ stratified sample


def test_stratified_sample_counts_are_proportional_by_largest_remainder():
    pool = [{"id": str(i), "instruction": "q", "output": "a", "source": s} for i, s in enumerate("A" * 50 + "B" * 30 + "C" * 20)]
    sample, report = stratified_sample(pool, 10, seed=3)
    assert {r["stratum"]: r["drawn"] for r in report["strata"]} == {"A": 5, "B": 3, "C": 2}
    assert [r["source"] for r in sample].count("A") == 5
    assert [int(r["id"]) for r in sample] == sorted(int(r["id"]) for r in sample)  # pool order kept
    assert stratified_sample(pool, 10, seed=3)[0] == sample and stratified_sample(pool, 10, seed=4)[0] != sample
    # quotas 3.5, 1.0, 0.5 -> floors 3, 1, 0; the one seat left goes to the larger remainder, A before C on a tie
    assert allocate({"A": 7, "B": 2, "C": 1}, 5) == {"A": 4, "B": 1, "C": 0}
    assert len(stratified_sample(pool, 500)[0]) == 100  # at most the pool
    with pytest.raises(SettingsError, match="at least 1"):
        stratified_sample(pool, 0)


def test_stratified_sample_by_source_and_length():
    pool = [{"id": str(i), "instruction": "q" * (i % 10 + 1), "output": "a", "source": "AB"[i % 2]} for i in range(100)]
    sample, report = stratified_sample(pool, 20, length_bins=2, seed=0)
    assert len(sample) == 20 and len(report["strata"]) == 4
    assert sum(r["pool"] for r in report["strata"]) == 100
    assert all(r["drawn"] == round(20 * r["pool"] / 100) for r in report["strata"])


def test_sample_command_writes_the_sample_and_refuses_a_bad_n(tmp_path, caplog):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": str(i), "instruction": "q", "output": "a", "source": "xy"[i % 2]}) + "\n" for i in range(40)))
    assert threeds(["sample", "--data", str(pool), "--n", "10", "--out", str(tmp_path / "s.jsonl"), "--seed", "1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and sum(r["source"] == "x" for r in rows) == 5
    assert threeds(["sample", "--data", str(pool), "--n", "0", "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "sample size 0: must be at least 1" in caplog.text
    with pytest.raises(SettingsError, match="needs --sample"):
        check_settings(SubsetConfig(stratify="source"))


# ------------------------------------------------------------------------------ layer cut


def test_kept_layers_are_evenly_spaced_with_both_ends():
    assert kept_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert kept_layers(4, 2) == [0, 3] and kept_layers(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(SettingsError, match="within 1-30"):
        kept_layers(30, 31)


def test_cut_model_runs_the_kept_layers_of_the_original(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer), layers=4)
    described = save_cut(model, tokenizer, 2, tmp_path / "cut", "tiny")
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert described["kept"] == [0, 3] and config["num_hidden_layers"] == 2 and config["layer_cut"]["kept"] == [0, 3]
    loaded, _ = load_model(str(tmp_path / "cut"), device="cpu")
    model.model.layers = torch.nn.ModuleList([model.model.layers[0], model.model.layers[3]])  # the original, layers 1-2 skipped
    model.config.num_hidden_layers = 2
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids, use_cache=False).logits, atol=1e-5)
    assert cut_model(tiny_llama(len(tokenizer), layers=4), 4)[1] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def scored_target(tmp_path_factory, tokenizer):
    """A 4-layer tiny target model, a target run of 36 records, and the target cut to 2 layers."""
    root = tmp_path_factory.mktemp("proxy")
    target = root / "target-model"
    tiny = tiny_llama(len(tokenizer), layers=4)
    tiny.save_pretrained(target)
    tokenizer.save_pretrained(target)
    save_cut(tiny, tokenizer, 2, root / "cut-model", str(target))
    records = make_records(36, seed=5)
    for i, record in enumerate(records):
        record["source"] = "abc"[i % 3]
    score_run(records, root / "run", ScoreConfig(chunk_size=16, function_words="lexical"), ModelConfig(model=str(target)),
              progress=False)  # fmt: skip
    return root


def test_proxy_check_of_the_target_itself_passes_with_perfect_agreement(scored_target, capsys):
    root = scored_target
    out = root / "self-check"
    code = threeds(["proxy-check", "--run", str(root / "run"), "--proxy", str(root / "target-model"), "--out", str(out),
                    "--pool-size", "45000"])  # fmt: skip
    check = json.loads((out / "proxy_check.json").read_text())
    assert code == 0, check["verdict"]
    found = check["agreement"]
    assert found["n"] == 36 and found["k"] == 4  # the run's sample_num 5000 scaled: 5000 x 36 / 45000
    assert all(found["metrics"][m]["spearman"]["rho"] == pytest.approx(1.0) for m in found["metrics"])
    assert found["picks"]["overlap"]["share"] == 1.0 and check["verdict"]["verdict"] == "passes"
    assert check["timing"]["projected_records"] == 45000 and check["timing"]["proxy_per_record"]["score"] > 0
    report = (out / "proxy_check.md").read_text()
    assert "**Verdict: passes.**" in report and "Spearman" in report


def test_proxy_check_of_the_layer_cut_with_its_own_answers(scored_target, capsys):
    root = scored_target
    out = root / "cut-check"
    args = ["proxy-check", "--run", str(root / "run"), "--proxy", str(root / "cut-model"), "--out", str(out),
            "--answers", "proxy", "--max-new-tokens", "4"]  # fmt: skip
    code = threeds(args)
    check = json.loads((out / "proxy_check.json").read_text())
    assert code == (0 if check["verdict"]["passed"] else 3)
    assert check["proxy"]["answers"] == "proxy" and (out / "generations.jsonl").is_file()
    assert check["timing"]["proxy_per_record"]["generate"] is not None
    target = pd.read_parquet(root / "run" / "metrics.parquet")
    proxy = pd.read_parquet(out / "metrics.parquet")
    rho = spearmanr(target["ins_ppl"], proxy["ins_ppl"]).statistic
    assert check["agreement"]["metrics"]["ins_ppl"]["spearman"]["rho"] == pytest.approx(rho)
    assert threeds(args) == code  # a rerun resumes: nothing is generated or scored again
    assert json.loads((out / "proxy_check.json").read_text())["agreement"] == check["agreement"]


def test_proxy_check_refuses_bad_input_in_one_line(scored_target, tmp_path, caplog):
    root = scored_target
    assert threeds(["proxy-check", "--run", str(tmp_path), "--proxy", str(root / "cut-model"), "--out", str(tmp_path / "o")]) == 1
    assert "missing (the run has not been scored)" in caplog.text
    caplog.clear()
    assert threeds(["proxy-check", "--run", str(root / "run"), "--proxy", "x", "--out", str(root / "run")]) == 2
    assert "the target run itself" in caplog.text
    caplog.clear()
    assert threeds(["proxy-check", "--run", str(root / "run"), "--proxy", "x", "--out", str(tmp_path / "o"), "--min-rho", "2"]) == 2
    assert [r.getMessage() for r in caplog.records] == ["--min-rho 2: must be within -1 to 1"]


def test_a_run_scored_by_the_proxy_links_its_check(scored_target, tmp_path, caplog):
    root = scored_target
    check_dir = root / "self-check"
    if not (check_dir / "proxy_check.json").is_file():
        threeds(["proxy-check", "--run", str(root / "run"), "--proxy", str(root / "target-model"), "--out", str(check_dir)])
    link = proxy_link(check_dir, str(root / "target-model"))
    assert link["path"] == str(check_dir.resolve()) and link["verdict"] in ("passes", "inconclusive", "fails")
    data = root / "run" / "data.jsonl"
    out = tmp_path / "pool-run"
    assert threeds(["score", "--data", str(data), "--out", str(out), "--model", str(root / "target-model"),
                    "--proxy-check", str(check_dir), "--function-words", "none"]) == 0  # fmt: skip
    assert json.loads((out / "manifest.json").read_text())["proxy_check"] == link
    caplog.clear()
    assert threeds(["score", "--data", str(data), "--out", str(tmp_path / "x"), "--model", str(root / "cut-model"),
                    "--proxy-check", str(check_dir)]) == 1  # fmt: skip
    assert "that check is of the proxy" in caplog.text
    assert same_model(str(root / "cut-model"), str(root / "cut-model") + "/") and not same_model("a", "b")


# ------------------------------------------------------------------------------ the app


def test_compare_shows_the_check_beside_the_run(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest
    from synthetic_run import make_run

    from threeds.io.data import write_json
    from threeds.stages.proxy_check import CheckConfig, check_scored
    from threeds.views.proxy_report import agreement_rows

    from threeds.views import embed_map

    cache = tmp_path / "cache"
    monkeypatch.setenv("THREEDS_CACHE", str(cache))
    monkeypatch.setattr(embed_map, "compute_umap", lambda emb, settings=None: np.asarray(emb[:, :2], np.float32))  # as test_app
    target, proxy = make_run(cache / "demo", n=40, seed=0), make_run(cache / "proxy", n=40, seed=1)
    check = check_scored(target, proxy, CheckConfig(proxy="tiny-proxy", pool_size=4000))
    write_json(proxy / "proxy_check.json", check)
    manifest = json.loads((proxy / "manifest.json").read_text())
    (proxy / "manifest.json").write_text(json.dumps({**manifest, "model": {"spec": "tiny-proxy"}}))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60).run()
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception, at.exception
    boxes = [e for kind in ("success", "warning", "error") for e in getattr(at, kind)]
    assert any(f"Verdict: {check['verdict']['verdict']}" in str(b.value) for b in boxes)
    shown = next(d.value for d in at.dataframe if "measure" in d.value.columns)
    assert shown["estimate"].tolist() == [row["estimate"] for row in agreement_rows(check)]
    assert "tiny-proxy" in "\n".join(str(m.value) for m in at.markdown)
    assert len(at.get("plotly_chart")) == 3 + 1 + 3  # Compare's histograms and map, then the check's scatters
    at.selectbox(key="compare_run_A").set_value("proxy").run()  # the proxy's own run: its check and its model
    assert not at.exception
    assert any("scored by `tiny-proxy`" in str(m.value) for m in at.markdown)
