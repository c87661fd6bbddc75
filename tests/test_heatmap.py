"""threeds.views.heatmap: the inspector's per-token views, against hand computations and a scored run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_records

from threeds.config import ModelConfig, ScoreConfig
from threeds.stages.pipeline import score_run
from threeds.views import heatmap


def tokens(losses, weights, function_words, starts) -> pd.DataFrame:
    n = len(losses)
    return pd.DataFrame({
        "id": "x", "response": "gt", "pos": range(n), "token": [f"t{i}" for i in range(n)],
        "start": starts, "end": [s + 1 for s in starts], "loss": losses, "w_mean": weights,
        "w_max": weights, "function_word": function_words,
    })  # fmt: skip


def test_share_and_contribution_by_hand():
    # text "abc": the 4th token starts at 3, past the text: the end-of-turn marker
    part = tokens([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4], [False, True, False, False], [0, 1, 2, 3])
    view = heatmap.token_view(part, "w_mean", text_length=3)
    # kept weights 0.1, 0.3, 0.4 (sum 0.8); the function word gets nothing
    assert view["share"].tolist() == pytest.approx([0.125, 0.0, 0.375, 0.5])
    assert view["contribution"].tolist() == pytest.approx([0.125, 0.0, 1.125, 2.0])
    assert view["marker"].tolist() == [False, False, False, True]
    # (1*0.1 + 3*0.3 + 4*0.4) / 0.8 = 3.25
    assert heatmap.weighted_loss(view) == pytest.approx(3.25)
    assert heatmap.marker_part(view) == pytest.approx((0.5, 2.0 / 3.25))


def test_no_kept_token_gives_nan_like_the_metric():
    view = heatmap.token_view(tokens([1.0, 2.0], [0.5, 0.5], [True, True], [0, 1]), "w_mean", 2)
    assert np.isnan(heatmap.weighted_loss(view))
    assert view["share"].tolist() == [0.0, 0.0] and heatmap.marker_part(view) == (0.0, 0.0)


def test_contributions_sum_to_the_metrics_of_a_scored_run(tmp_path, tiny_model_dir):
    records = make_records(6)
    score_run(records, tmp_path / "run", ScoreConfig(chunk_size=3, function_words="lexical"),
              ModelConfig(model=str(tiny_model_dir)), progress=False)  # fmt: skip
    metrics = pd.read_parquet(tmp_path / "run" / "metrics.parquet").set_index("id")
    all_tokens = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    texts = {r["id"]: r for r in map(json.loads, (tmp_path / "run" / "data.jsonl").read_text().splitlines())}
    checked = 0
    for (sample_id, response), part in all_tokens.groupby(["id", "response"]):
        text = texts[sample_id]["output" if response == "gt" else "generated_output"]
        assert part["function_word"].any() and not part["function_word"].all()
        for method in ("mean", "max"):
            view = heatmap.token_view(part.sort_values("pos"), f"w_{method}", len(text))
            assert heatmap.weighted_loss(view) == pytest.approx(metrics.loc[sample_id, f"{response}_wloss_{method}"], rel=1e-12)
            assert view["marker"].sum() == 1 and view["marker"].iloc[-1]  # <|im_end|>, one token, last
            checked += 1
    assert checked == 6 * 2 * 2


def test_robust_scale_by_hand():
    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    counted = np.array([True, True, True, True, False])  # the 100 (a sink) does not set the scale
    scale = heatmap.robust_scale(values, counted, percentile=50)
    assert scale.top == 2.5  # median of 1..4
    assert scale.fill.tolist() == pytest.approx([0.4, 0.8, 1.0, 1.0, 1.0])
    assert scale.clipped.tolist() == [False, False, True, True, True]
    default = heatmap.robust_scale(values, counted)  # 95th percentile of 1..4: 1 + 0.95 * 3
    assert default.top == pytest.approx(3.85) and default.clipped.tolist() == [False, False, False, True, True]


def test_a_single_dominant_token_is_clipped_not_the_scale():
    values = np.r_[np.linspace(0.01, 0.02, 40), 1.0]
    scale = heatmap.robust_scale(values, np.ones(41, bool))
    # 95th percentile of 41 values: sorted index 0.95 * 40 = 38, i.e. 0.01 + 38/39 * 0.01
    assert scale.top == pytest.approx(0.01 + 38 / 39 * 0.01) and scale.clipped.tolist() == [False] * 39 + [True] * 2
    assert scale.fill[:38].min() > 0.45  # the ordinary tokens are visible, not washed out


def test_robust_scale_fallbacks():
    values = np.array([0.0, 2.0, 4.0])
    assert heatmap.robust_scale(values, np.zeros(3, bool)).top == 4.0  # nothing counted: the largest
    assert heatmap.robust_scale(np.zeros(3), np.ones(3, bool)).top == 1.0  # all zero: no division by 0
    nan = heatmap.robust_scale(np.array([np.nan, 1.0]), np.ones(2, bool), percentile=100)
    assert nan.fill.tolist() == [0.0, 1.0] and not nan.clipped.any()


def test_view_scale_leaves_out_function_words_and_the_marker():
    part = tokens([1.0, 2.0, 50.0, 9.0], [0.1, 0.2, 0.3, 0.4], [False, False, True, False], [0, 1, 2, 3])
    view = heatmap.token_view(part, "w_mean", text_length=3)
    scale = heatmap.view_scale(view, "loss", percentile=100)
    assert scale.top == 2.0  # the function word's 50 and the marker's 9 are shown but do not set it
    assert scale.clipped.tolist() == [False, False, False, True]  # the function word is grey, not clipped
