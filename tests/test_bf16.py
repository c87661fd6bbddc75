"""The bfloat16 path (the GPU default) agrees with the float32 path within bf16 round-off.

bfloat16 keeps 8 significant bits: unit round-off u = 2^-8 ~ 3.9e-3. Hidden states, logits and the
last layer's queries and keys carry a few u of relative error; the losses and attention
probabilities are then computed in float32 from them. Per-sample metrics average hundreds of
token terms, so their error stays near u (measured: <= 0.6% on ins_ppl, <= 0.25% on the weighted
losses); the test allows rel 2e-2 (~5u). Single-token weights can move by a few percent (a score of
magnitude s gets an absolute error of ~s*u, which shifts its probability by that fraction), so
they are compared in aggregate: L1 error <= 5e-2 of the L1 norm (measured ~1%).

The tiny random model's weights are scaled up 10x (std 0.2): with the default std 0.02 attention
is almost uniform and every loss is ~ln(vocab), which any precision reproduces. Scaled, the metrics
spread over 10-40% across samples, well above the tolerance, so the test tells samples apart.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_records, tiny_llama

from threeds.config import ModelConfig, ScoreConfig
from threeds.model.attention import capture_last_layer, use_threeds_attention
from threeds.stages.score import build_scorer

METRICS = ["ins_ppl", "gt_wloss_mean", "gt_wloss_max", "gen_wloss_mean", "gen_wloss_max"]
SETTINGS = ScoreConfig(function_words="lexical")


@pytest.fixture(scope="module")
def models(tokenizer):
    """(float32, bfloat16) copies of one tiny random model with peaked attention and logits."""
    fp32 = tiny_llama(len(tokenizer), seed=3, layers=3)
    with torch.no_grad():
        for param in fp32.parameters():
            if param.dim() == 2:
                param.mul_(10)
    return fp32, copy.deepcopy(fp32).to(torch.bfloat16)


@pytest.fixture(scope="module")
def results(tokenizer, models):
    records = make_records(8, seed=11)
    return [build_scorer(model, tokenizer, SETTINGS, ModelConfig()).score(records) for model in models]


def test_bf16_metrics_agree_with_float32(results):
    fp32, bf16 = results
    for col in METRICS:
        spread = fp32.metrics[col].max() / fp32.metrics[col].min() - 1
        assert spread > 0.05, f"{col}: samples too alike for the test to mean anything"
        np.testing.assert_allclose(bf16.metrics[col], fp32.metrics[col], rtol=2e-2, err_msg=col)
    error = np.linalg.norm(bf16.embeddings - fp32.embeddings) / np.linalg.norm(fp32.embeddings)
    assert error < 2e-2


def test_bf16_token_values_agree_in_aggregate(results):
    fp32, bf16 = results
    assert (fp32.tokens[["id", "response", "pos"]] == bf16.tokens[["id", "response", "pos"]]).all().all()
    for col in ("loss", "w_mean", "w_max"):
        a, b = fp32.tokens[col].to_numpy(), bf16.tokens[col].to_numpy()
        assert np.abs(b - a).sum() <= 5e-2 * np.abs(a).sum(), col


def test_bf16_model_keeps_last_layer_probabilities_in_float32(models):
    """Every query row of float32 probabilities sums to 1, so the column sums over all keys total the
    number of real rows L to ~1e-7; probabilities rounded to bf16 miss by ~1e-4 (checked by rounding
    them on purpose), beyond the 1e-5 allowed."""
    bf16 = use_threeds_attention(models[1])
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.inference_mode(), capture_last_layer(bf16, mask) as capture:
        bf16(input_ids=ids, attention_mask=mask)
    assert capture.w_mean.dtype == torch.float32 and capture.w_max.dtype == torch.float32
    for row, n in enumerate((40, 25)):
        column_sums = capture.w_mean[row, :n].double() * (n - torch.arange(n))
        assert column_sums.sum().item() == pytest.approx(n, rel=1e-5)
