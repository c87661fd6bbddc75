"""Stage-2 scoring: attention capture, hand-computed pieces, the naive reference, invariances."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_records, tiny_llama
from naive_score import naive_sample

from threeds.attention import capture_last_layer, use_threeds_attention
from threeds.function_words import FunctionWords
from threeds.prompts import prompt_format
from threeds.score import Scorer, encode, plan_batches, prompt_perplexity, weighted_loss

METRICS = ["ins_ppl", "gt_wloss_mean", "gt_wloss_max", "gen_wloss_mean", "gen_wloss_max"]


def test_weighted_loss_by_hand():
    # kept tokens 0 and 2: (1*0.5 + 3*0.25) / (0.5 + 0.25) = 1.25 / 0.75
    losses = np.array([1.0, 2.0, 3.0])
    weights = np.array([0.5, 0.25, 0.25])
    assert weighted_loss(losses, weights, np.array([True, False, True])) == pytest.approx(1.25 / 0.75)
    # renormalising the weights does not change it
    assert weighted_loss(losses, weights * 7, np.array([True, False, True])) == pytest.approx(1.25 / 0.75)
    assert math.isnan(weighted_loss(losses, weights, np.zeros(3, dtype=bool)))
    assert math.isnan(weighted_loss(np.array([]), np.array([]), np.array([], dtype=bool)))


def test_plan_batches_respects_budget_and_padding():
    # sorted lengths 8, 5, 3, 2 with any padding allowed: [8] alone (2 x 8 > 10), [5, 3] (2 x 5 = 10), [2]
    assert plan_batches([5, 3, 8, 2], batch_tokens=10, max_padding=1.0) == [[2], [0, 1], [3]]
    # at most 10% padding: 3 would be padded by 40% next to 5, so it goes alone
    assert plan_batches([5, 3, 8, 2], batch_tokens=10) == [[2], [0], [1], [3]]
    assert plan_batches([10, 9, 10, 9, 8], batch_tokens=100) == [[0, 2, 1, 3], [4]]
    # a sequence longer than the budget still gets a batch of its own
    assert plan_batches([50, 1], batch_tokens=10) == [[0], [1]]


def test_capture_matches_all_eager_on_padded_batch():
    model = tiny_llama(100, layers=3)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    use_threeds_attention(model)
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    with torch.inference_mode(), capture_last_layer(model, mask) as cap:
        logits = model(input_ids=ids, attention_mask=mask).logits
    for b in range(3):
        n = int(mask[b].sum())
        with torch.inference_mode():
            ref = eager(input_ids=ids[b : b + 1, :n], output_attentions=True)
        att = ref.attentions[-1][0]
        torch.testing.assert_close(cap.w_mean[b, :n], att.sum(1).mean(0) / (n - torch.arange(n)), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cap.w_max[b, :n], att.amax(1).mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(logits[b, :n], ref.logits[0], atol=1e-5, rtol=1e-5)


def test_mean_weights_by_hand():
    """One head, three tokens with known probabilities: w_k = sum_q att[q,k] / (L - k)."""
    from threeds.attention import head_sums, normalise_mean

    att = torch.tensor([[[[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.5, 0.25, 0.25]]]])
    sums, maxes = head_sums(att, torch.ones(1, 3, dtype=torch.bool))
    # key 0: (1 + 0.25 + 0.5) / 3; key 1: (0.75 + 0.25) / 2; key 2: 0.25 / 1
    torch.testing.assert_close(normalise_mean(sums, torch.ones(1, 3, dtype=torch.bool)), torch.tensor([[1.75 / 3, 0.5, 0.25]]))
    torch.testing.assert_close(maxes, torch.tensor([[1.0, 0.75, 0.25]]))


def test_encode_splits_prompt_and_response(tokenizer):
    fmt = prompt_format(tokenizer)
    prompt = fmt.prompt("What is a fever?")
    enc = encode(tokenizer, prompt, "A raised body temperature.", fmt.end_of_turn, max_length=1024)
    assert enc.text == prompt + "A raised body temperature." + "<|im_end|>"
    assert all(s < len(prompt) for s, _ in enc.offsets[: enc.n_prompt])
    assert all(s >= len(prompt) for s, _ in enc.offsets[enc.n_prompt :])
    response = "".join(enc.text[s:e] for s, e in enc.offsets[enc.n_prompt :])
    assert response == "A raised body temperature.<|im_end|>"
    assert tokenizer.decode(enc.ids[-1:]) == "<|im_end|>"
    assert not enc.truncated
    short = encode(tokenizer, prompt, "A raised body temperature.", fmt.end_of_turn, max_length=5)
    assert short.truncated and len(short.ids) == 5 and short.n_prompt == 5


@pytest.mark.parametrize("mode", ["none", "lexical"])
def test_scorer_matches_naive_reference(tokenizer, tiny_model, mode):
    fmt = prompt_format(tokenizer)
    fw = FunctionWords(mode)
    records = make_records(6)
    eager = copy.deepcopy(tiny_model)
    eager.set_attn_implementation("eager")
    use_threeds_attention(tiny_model)
    result = Scorer(tiny_model, tokenizer, fmt, fw, max_length=256, batch_tokens=4096).score(records)
    for i, record in enumerate(records):
        ref = naive_sample(eager, tokenizer, fmt, fw, record, max_length=256)
        row = result.metrics.iloc[i]
        for col in METRICS:
            assert row[col] == pytest.approx(ref[col], rel=1e-5), col
        np.testing.assert_allclose(result.embeddings[i], ref["embedding"], rtol=1e-5, atol=1e-6)
        assert row["gt_tokens"] == ref["gt_tokens"] and row["gen_tokens"] == ref["gen_tokens"]


def test_batch_size_and_padding_invariance(tokenizer, tiny_model):
    fmt = prompt_format(tokenizer)
    use_threeds_attention(tiny_model)
    records = make_records(12, seed=3)
    one = Scorer(tiny_model, tokenizer, fmt, FunctionWords("lexical"), batch_tokens=1).score(records)
    many = Scorer(tiny_model, tokenizer, fmt, FunctionWords("lexical"), batch_tokens=100_000).score(records)
    for col in METRICS:
        np.testing.assert_allclose(one.metrics[col], many.metrics[col], rtol=2e-5)
    np.testing.assert_allclose(one.embeddings, many.embeddings, rtol=1e-4, atol=1e-6)
    pd.testing.assert_frame_equal(one.tokens, many.tokens, rtol=1e-4, atol=1e-6)


def test_ins_ppl_equals_exp_mean_prompt_loss(tokenizer, tiny_model):
    """Independent of the rest: a labels-based HF loss on P alone gives the same perplexity."""
    fmt = prompt_format(tokenizer)
    use_threeds_attention(tiny_model)
    record = make_records(1)[0]
    result = Scorer(tiny_model, tokenizer, fmt, FunctionWords("none")).score([record])
    ids = tokenizer(fmt.prompt(record["instruction"]), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = tiny_model(input_ids=ids, labels=ids).loss
    assert result.metrics.loc[0, "ins_ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_truncation_gives_nan_not_crash(tokenizer, tiny_model):
    fmt = prompt_format(tokenizer)
    use_threeds_attention(tiny_model)
    records = make_records(3)
    n_prompt = len(tokenizer(fmt.prompt(records[0]["instruction"]), add_special_tokens=False)["input_ids"])
    result = Scorer(tiny_model, tokenizer, fmt, FunctionWords("none"), max_length=n_prompt).score(records[:1])
    row = result.metrics.iloc[0]
    assert row["truncated"] and row["gt_tokens"] == 0
    assert math.isnan(row["gt_wloss_mean"]) and math.isnan(row["gen_wloss_max"])
    assert np.isfinite(row["ins_ppl"])


def test_token_rows_describe_the_response(tokenizer, tiny_model):
    fmt = prompt_format(tokenizer)
    use_threeds_attention(tiny_model)
    record = {"id": "x", "instruction": "Why cough?", "output": "The lungs are irritated.", "generated_output": "Dust."}
    tokens = Scorer(tiny_model, tokenizer, fmt, FunctionWords("lexical")).score([record]).tokens
    gt = tokens[tokens.response == "gt"]
    assert "".join(gt.token) == "The lungs are irritated.<|im_end|>"
    assert list(gt.pos) == list(range(len(gt)))
    flagged = set(gt[gt.function_word].token.str.strip())
    assert {"The", "are", "."} <= flagged and "lungs" not in flagged
    assert not gt.iloc[-1].function_word  # the end-of-turn marker lies past the text
    assert (gt.loss > 0).all() and (gt.w_mean > 0).all()


def test_prompt_perplexity_of_one_token_prompt_is_nan():
    from threeds.score import Encoded, SequenceOut

    enc = Encoded([1, 2], [(0, 1), (1, 2)], 1, 1, "ab", False)
    out = SequenceOut(np.array([0.0, 2.0]), np.ones(2), np.ones(2), np.zeros(1))
    assert math.isnan(prompt_perplexity(enc, out))
