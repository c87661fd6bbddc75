"""Stage-2 scoring: attention capture, hand-computed pieces, the naive reference, invariances."""

from __future__ import annotations

import copy
import math
import random
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_records, tiny_llama
from naive_score import naive_sample

import threeds.stages.score as score_module
from threeds.model.attention import capture_last_layer, use_threeds_attention
from threeds.model.function_words import FunctionWords
from threeds.model.prompts import prompt_format
from threeds.stages.score import (
    RESPONSES,
    Scorer,
    encode,
    encode_texts,
    plan_batches,
    prompt_perplexity,
    weighted_loss,
)

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
    from threeds.model.attention import head_sums, normalise_mean

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
    from threeds.stages.score import Encoded, SequenceOut

    enc = Encoded([1, 2], [(0, 1), (1, 2)], 1, 1, "ab", False)
    out = SequenceOut(np.array([0.0, 2.0]), np.ones(2), np.ones(2), np.zeros(1))
    assert math.isnan(prompt_perplexity(enc, out))


# ---------------------------------------------------------------------------------------------
# The host pipeline of Scorer.score_chunks
# ---------------------------------------------------------------------------------------------


def pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("threeds-")]


def serial_reference(scorer: Scorer, records: list[dict]) -> dict:
    """Every step in turn without the pipeline: one tokenizer call per text, `run_sequences`, then the
    metrics; the numbers the pipeline must reproduce exactly."""
    encoded = [enc[name] for r in records for enc in [scorer.encode_record(r)] for name in RESPONSES]
    outs = scorer.run_sequences(encoded)
    responses = scorer.responses(encoded)
    ref = {"id": [], "ins_ppl": [], "gt_wloss_mean": [], "gen_wloss_max": [], "gen_kept_tokens": [], "embedding": []}
    for i, record in enumerate(records):
        gt, gen = 2 * i, 2 * i + 1
        resp = slice(encoded[gen].n_prompt, len(encoded[gen].ids))
        ref["id"].append(record["id"])
        ref["ins_ppl"].append(prompt_perplexity(encoded[gt], outs[gt]))
        keep = ~responses[gt].function_word
        span = slice(encoded[gt].n_prompt, len(encoded[gt].ids))
        ref["gt_wloss_mean"].append(weighted_loss(outs[gt].ce[span], outs[gt].w_mean[span], keep))
        ref["gen_wloss_max"].append(weighted_loss(outs[gen].ce[resp], outs[gen].w_max[resp], ~responses[gen].function_word))
        ref["gen_kept_tokens"].append(int((~responses[gen].function_word).sum()))
        ref["embedding"].append(outs[gt].embedding)
    return ref


def test_encode_texts_matches_encode(tokenizer):
    fmt = prompt_format(tokenizer)
    records = make_records(8, seed=7)
    prompts = [fmt.prompt(r["instruction"]) for r in records]
    prompts[3] = prompts[2]  # a prompt met twice is tokenised once, with the same result
    tails = [r["output"] + fmt.end_of_turn for r in records]
    for max_length in (1024, 12):
        many = encode_texts(tokenizer, prompts, tails, max_length)
        assert many == [encode(tokenizer, p, r["output"], fmt.end_of_turn, max_length) for p, r in zip(prompts, records)]
    assert encode_texts(tokenizer, [], [], 1024) == []


def test_encode_without_leading_whitespace_equals_one_call(tokenizer):
    """Where the answer starts with a visible character, `ids(P) + ids(R + E)` is what one call over
    `P + R + E` gives: no token crosses P's end, so scores of such records did not move."""
    fmt = prompt_format(tokenizer)
    for record in make_records(8, seed=4):
        prompt = fmt.prompt(record["instruction"])
        text = prompt + record["output"] + fmt.end_of_turn
        whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        enc = encode(tokenizer, prompt, record["output"], fmt.end_of_turn, 1024)
        assert enc.ids == whole["input_ids"] and enc.offsets == [tuple(o) for o in whole["offset_mapping"]]


LEADS = ["", " ", "\n", "\n\n"]


def test_prompt_tokens_do_not_depend_on_leading_whitespace(tokenizer):
    """One call over `P + R + E` merged P's final "\n" with R's leading whitespace (issue 23)."""
    fmt = prompt_format(tokenizer)
    prompt = fmt.prompt("What is a fever?")
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for lead in LEADS:
        enc = encode(tokenizer, prompt, lead + "A raised body temperature.", fmt.end_of_turn, 1024)
        assert enc.ids[: enc.n_prompt] == alone, repr(lead)
        response = "".join(enc.text[s:e] for s, e in enc.offsets[enc.n_prompt :])
        assert response == lead + "A raised body temperature.<|im_end|>"
        assert enc.offsets[enc.n_prompt][0] == len(prompt)
    merged = tokenizer(prompt + "\n\nA", add_special_tokens=False)["input_ids"]
    assert merged[: len(alone)] != alone  # what the old single call did with this tokenizer


def test_instruction_scores_do_not_depend_on_leading_whitespace(tokenizer, tiny_model):
    fmt = prompt_format(tokenizer)
    use_threeds_attention(tiny_model)
    base = {"instruction": "Why do I cough at night?", "output": "Mucus drains when you lie down.",
            "generated_output": "Because of asthma."}  # fmt: skip
    records = [{**base, "id": f"r{i}", "output": lead + base["output"]} for i, lead in enumerate(LEADS)]
    result = Scorer(tiny_model, tokenizer, fmt, FunctionWords("lexical"), batch_tokens=64).score(records)
    np.testing.assert_allclose(result.metrics.ins_ppl, result.metrics.ins_ppl[0], rtol=1e-6)
    assert result.metrics.prompt_tokens.nunique() == 1
    np.testing.assert_allclose(result.embeddings, np.repeat(result.embeddings[:1], len(LEADS), 0), rtol=1e-5, atol=1e-6)
    gt = result.tokens[result.tokens.response == "gt"]
    assert all("".join(gt[gt.id == r["id"]].token) == r["output"] + "<|im_end|>" for r in records)  # the whitespace is R's


def test_pipeline_keeps_order_and_numbers_with_many_batches(tokenizer, tiny_model, monkeypatch):
    """Small batches (17, far more than are ever in flight), an empty chunk, and random delays in
    both background threads: results come out in chunk and record order, equal to the serial
    computation to the last bit."""
    fmt = prompt_format(tokenizer)
    use_threeds_attention(tiny_model)
    scorer = Scorer(tiny_model, tokenizer, fmt, FunctionWords("lexical"), max_length=256, batch_tokens=1)
    records = make_records(16, seed=11)
    chunks = [records[:5], [], records[5:12], records[12:]]
    calm = [scorer.score(c) for c in chunks]

    jitter = random.Random(0)
    finish, respond = scorer._finish_batch, scorer.responses

    def slow_finish(*args):
        time.sleep(jitter.uniform(0, 0.02))
        return finish(*args)

    def slow_responses(encoded):
        time.sleep(jitter.uniform(0, 0.05))
        return respond(encoded)

    monkeypatch.setattr(scorer, "_finish_batch", slow_finish)
    monkeypatch.setattr(scorer, "responses", slow_responses)
    seen = []
    results = list(scorer.score_chunks(iter(chunks), progress=seen.append))
    assert len(results) == len(chunks) and sum(seen) == 2 * len(records) and len(seen) >= 12
    for chunk, result, again in zip(chunks, results, calm):
        assert list(result.metrics.id) == [r["id"] for r in chunk]
        pd.testing.assert_frame_equal(result.metrics, again.metrics, check_exact=True)
        pd.testing.assert_frame_equal(result.tokens, again.tokens, check_exact=True)
        np.testing.assert_array_equal(result.embeddings, again.embeddings)
        if not chunk:
            assert result.embeddings.shape == (0, 32) and result.tokens.empty
            continue
        ref = serial_reference(scorer, chunk)
        for col in ("ins_ppl", "gt_wloss_mean", "gen_wloss_max", "gen_kept_tokens"):
            np.testing.assert_array_equal(result.metrics[col].to_numpy(dtype=float), np.array(ref[col], dtype=float), col)
        np.testing.assert_array_equal(result.embeddings, np.stack(ref["embedding"]))
        for response in RESPONSES:
            counts = result.tokens[result.tokens.response == response].groupby("id", sort=False).size()
            assert list(counts.index) == list(result.metrics.id)
    assert not pipeline_threads()


def test_pipeline_overlaps_host_work_with_the_model(tokenizer, tiny_model, monkeypatch):
    """Proof by handshake: a piece of host work first waits until the calling thread is inside
    `launch_batch` (where the model runs), and that forward pass does not go on until the work is
    done. Done one step after another, each handshake would time out. The pieces:

    - during chunk A's first batch: A's function words and the tokenising of the next chunk, B;
    - during batch k of A: turning batch k-2's outputs into rows."""
    fmt = prompt_format(tokenizer)
    use_threeds_attention(tiny_model)
    scorer = Scorer(tiny_model, tokenizer, fmt, FunctionWords("lexical"), max_length=256, batch_tokens=1)
    records = make_records(6, seed=2)
    chunks = [records[:4], records[4:]]
    n_first = len(plan_batches([len(e.ids) for e in scorer.encode_records(chunks[0])], scorer.batch_tokens))
    assert n_first >= 5
    running = [threading.Event() for _ in range(n_first)]  # the calling thread is in launch k of chunk A
    done = [threading.Event() for _ in range(n_first)]  # the host work promised for launch k is done
    handshakes, threads, finishes = [], {}, []
    encode_records, responses = scorer.encode_records, scorer.responses
    finish, launch = scorer._finish_batch, score_module.launch_batch

    def during(k: int, what: str, work, last: bool = True):
        threads.setdefault(what, set()).add(threading.current_thread().name.rsplit("_", 1)[0])
        handshakes.append((what, k, running[k].wait(20)))
        out = work()
        if last:
            done[k].set()
        return out

    def encode_watched(recs):
        if recs and recs[0]["id"] == chunks[1][0]["id"]:
            return during(0, "tokenise B", lambda: encode_records(recs))
        return encode_records(recs)

    def responses_watched(encoded):
        if len(encoded) == 2 * len(chunks[0]):
            return during(0, "function words of A", lambda: responses(encoded), last=False)
        return responses(encoded)

    def finish_watched(*args):
        j = len(finishes)
        finishes.append(j)
        if j + 2 < n_first:
            return during(j + 2, "rows", lambda: finish(*args))
        return finish(*args)

    launches = []

    def gated_launch(*args):
        k = len(launches)
        launches.append(k)
        threads.setdefault("model", set()).add(threading.current_thread().name)
        if k < n_first:
            running[k].set()
            if k != 1:
                handshakes.append(("model", k, done[k].wait(20)))
        return launch(*args)

    monkeypatch.setattr(scorer, "encode_records", encode_watched)
    monkeypatch.setattr(scorer, "responses", responses_watched)
    monkeypatch.setattr(scorer, "_finish_batch", finish_watched)
    monkeypatch.setattr(score_module, "launch_batch", gated_launch)
    results = list(scorer.score_chunks(chunks))
    assert [list(r.metrics.id) for r in results] == [[r["id"] for r in c] for c in chunks]
    failed = [(what, k) for what, k, ok in handshakes if not ok]
    assert not failed, f"host work not done while the model ran: {failed}"
    assert len(handshakes) == 2 * (n_first - 2) + 3
    assert threads == {"model": {threading.main_thread().name}, "tokenise B": {"threeds-prep"},
                       "function words of A": {"threeds-prep"}, "rows": {"threeds-post"}}  # fmt: skip


def _bad_records(kind: str) -> list[dict]:
    records = make_records(6, seed=1)
    if kind == "missing":
        del records[4]["generated_output"]
    else:
        records[4]["output"] = None
    return records


@pytest.mark.parametrize("kind", ["missing", "not a string"])
def test_bad_record_fails_as_before_and_earlier_chunks_come_out(tokenizer, tiny_model, kind):
    fmt = prompt_format(tokenizer)
    use_threeds_attention(tiny_model)
    scorer = Scorer(tiny_model, tokenizer, fmt, FunctionWords("lexical"), batch_tokens=1)
    records = _bad_records(kind)
    with pytest.raises(Exception) as serial:
        [scorer.encode_record(r) for r in records]  # the error of the one-record-at-a-time path
    with pytest.raises(type(serial.value)) as piped:
        scorer.score(records)
    assert str(piped.value) == str(serial.value)
    assert not pipeline_threads()
    out = []
    with pytest.raises(type(serial.value)) as piped:
        for result in scorer.score_chunks([records[:3], records[3:]]):
            out.append(result)
    assert str(piped.value) == str(serial.value)
    assert [list(r.metrics.id) for r in out] == [["r0", "r1", "r2"]]  # finished before the failure
    assert not pipeline_threads()


@pytest.mark.parametrize("stage", ["function words", "rows"])
def test_background_errors_surface(tokenizer, tiny_model, monkeypatch, stage):
    fmt = prompt_format(tokenizer)
    use_threeds_attention(tiny_model)
    scorer = Scorer(tiny_model, tokenizer, fmt, FunctionWords("lexical"), batch_tokens=1)

    def boom(*args, **kwargs):
        raise RuntimeError(f"boom in {stage}")

    if stage == "function words":
        monkeypatch.setattr(scorer.fw, "flags", boom)
    else:
        monkeypatch.setattr(scorer, "_score_sequence", boom)
    with pytest.raises(RuntimeError, match=f"boom in {stage}"):
        list(scorer.score_chunks([make_records(3), make_records(2, seed=9)]))
    assert not pipeline_threads()


def test_interrupt_stops_the_pipeline_promptly(tokenizer, tiny_model, monkeypatch):
    """Ctrl-C in the model's thread while both background threads have work queued: it propagates at
    once and every pipeline thread is gone (nothing blocks on a full queue)."""
    fmt = prompt_format(tokenizer)
    use_threeds_attention(tiny_model)
    scorer = Scorer(tiny_model, tokenizer, fmt, FunctionWords("lexical"), batch_tokens=1)
    launch, calls, encoded = score_module.launch_batch, [], []
    encode_records = scorer.encode_records

    def slow_encode(recs):
        encoded.append(1)
        time.sleep(0.2)
        return encode_records(recs)

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return launch(*args)

    monkeypatch.setattr(scorer, "encode_records", slow_encode)
    monkeypatch.setattr(score_module, "launch_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        for _ in scorer.score_chunks([make_records(4, seed=s) for s in range(20)]):
            pass
    assert not pipeline_threads()
    assert len(encoded) < 20  # stopped with chunks left, not after encoding all of them
