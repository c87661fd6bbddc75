"""Greedy decoding with continuous refill (threeds.model.decode) and logits rating (threeds.stages.rating_logits):
the answers of plain `model.generate` one prompt at a time, each reported as it finishes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from transformers import GenerationConfig

from threeds.config import RateConfig
from threeds.model.backends import LocalBackend
from threeds.model.decode import MIN_SHARED_PREFIX, greedy_decode, shared_prefix
from threeds.stages import rating_logits
from threeds.stages.rate import LogitsRater, rate_records
from threeds.stages.rating_logits import (
    RatingModeError,
    digit_ids,
    expected_scores,
    number_probs,
    prompt_batches,
)


def generate_one(model, ids: list[int], stop: list[int], max_new_tokens: int) -> list[int]:
    """The plain transformers pattern, one prompt alone: greedy tokens cut before the first stop."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=0)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=config)[0, len(ids):].tolist()  # fmt: skip
    return out[: next((j for j, t in enumerate(out) if t in stop), len(out))]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(256, seed=3)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 256, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 5, 12, 22)]


@pytest.fixture(scope="module")
def stop(tiny, prompts):
    """A token the model writes early in some answers and not in others, so rows end at different steps."""
    free = [generate_one(tiny, p, [], 12) for p in prompts]
    return [next(t for t in free[1][2:] if sum(t in f for f in free) < len(free))]


@pytest.mark.parametrize(("max_rows", "batch_tokens"), [(2, 10**6), (3, 10**6), (64, 10**6), (64, 1)])
def test_refilled_batches_give_the_answers_of_one_prompt_at_a_time(tiny, prompts, stop, max_rows, batch_tokens):
    reference = [generate_one(tiny, p, stop, 12) for p in prompts]
    assert len({len(r) for r in reference}) > 2  # rows really finish at different steps
    got = greedy_decode(tiny, prompts, stop, 12, max_rows=max_rows, batch_tokens=batch_tokens)
    assert got == reference


def test_each_answer_is_reported_when_it_finishes(tiny, prompts, stop):
    """All prompts start together here, so they must be reported shortest answer first, each once."""
    reported = []
    got = greedy_decode(tiny, prompts, stop, 12, on_done=lambda i, tokens, s: reported.append((i, tokens, s)))
    assert sorted(i for i, _, _ in reported) == list(range(len(prompts)))
    assert [len(t) for _, t, _ in reported] == sorted(len(t) for t in got)
    assert all(got[i] == t and s > 0 for i, t, s in reported)


def test_a_prompt_that_stops_at_once_and_max_new_tokens_one(tiny, prompts):
    first = [generate_one(tiny, p, [], 1)[0] for p in prompts]
    got = greedy_decode(tiny, prompts, [first[0]], 5, max_rows=2)
    assert got[0] == [] and got == [generate_one(tiny, p, [first[0]], 5) for p in prompts]
    assert greedy_decode(tiny, prompts, [], 1) == [[t] for t in first]


def test_a_long_common_start_is_prefilled_once_and_answers_stay_those_of_one_prompt_at_a_time(tiny, stop):
    """Rating prompts share their instructions and examples: that start is computed once."""
    g = torch.Generator().manual_seed(5)
    start = torch.randint(1, 256, (MIN_SHARED_PREFIX + 6,), generator=g).tolist()
    prompts = [start + torch.randint(1, 256, (n,), generator=g).tolist() for n in (1, 7, 3, 12)]
    prefix = shared_prefix(tiny, prompts)
    assert prefix.length == len(start) and prefix.kv[0][0].shape[2] == len(start)
    calls = []
    forward = tiny.forward
    tiny.forward = lambda *a, **k: calls.append(k["input_ids"].shape[1]) or forward(*a, **k)
    try:
        got = greedy_decode(tiny, prompts, stop, 12, max_rows=2)
    finally:
        del tiny.forward
    assert calls.count(len(start)) == 1 and sorted(calls)[-2] <= 12  # the start once, then each prompt's own tokens
    assert got == [generate_one(tiny, p, stop, 12) for p in prompts]


def test_a_short_or_whole_common_start_is_not_shared(tiny):
    start = list(range(1, MIN_SHARED_PREFIX))
    assert shared_prefix(tiny, [start + [7], start + [9]]) is None  # one token short of the minimum
    same = list(range(1, 2 * MIN_SHARED_PREFIX))
    assert shared_prefix(tiny, [same, same]).length == len(same) - 1  # each prompt keeps a token of its own
    assert shared_prefix(tiny, []) is None


@pytest.mark.integration
def test_local_backend_gives_plain_generate_answers_on_the_embedded_model():
    """The embedded model at its run dtype: the backend's refilled batches against plain
    `model.generate` one prompt at a time."""
    from threeds.model.backends import _stop_ids

    prompts = ["What is hypertension?", "Name one symptom of flu.", "Why does a cough last three weeks after a cold?",
               "Hi", "What are the treatments for Paget's disease of bone?"]  # fmt: skip
    backend = LocalBackend(batch_size=3)
    seen = []
    replies = backend.chat(prompts, 24, lambda i, r: seen.append(i))
    model, tokenizer = backend.load()
    encoded, end_of_turn = backend.encode(prompts)
    stop = _stop_ids(tokenizer, end_of_turn)
    expected = [tokenizer.decode(generate_one(model, e, stop, 24), skip_special_tokens=True) for e in encoded]
    assert [r.text for r in replies] == expected and sorted(seen) == list(range(len(prompts)))
    assert all(t.strip() for t in expected)


# ------------------------------------------------------------------------------------ logits rating


def test_number_probs_by_hand():
    """p1: "9" 0.5, "1" 0.5. After "9": "0" 0.6, else a non-digit. After "1": "0" 1.0; after "10":
    "0" 0.5 (100), "5" 0.25 (105: over 100, left out), a non-digit 0.25 (10)."""
    p1 = torch.zeros(10)
    p1[9] = p1[1] = 0.5
    after9, after1, p3 = torch.zeros(10), torch.zeros(10), torch.zeros(10)
    after9[0], after1[0], p3[0], p3[5] = 0.6, 1.0, 0.5, 0.25
    probs = number_probs(p1, {9: after9, 1: after1}, p3)
    assert probs[90] == pytest.approx(0.3) and probs[9] == pytest.approx(0.2)
    assert probs[100] == pytest.approx(0.25) and probs[10] == pytest.approx(0.125)
    assert sum(probs.values()) == pytest.approx(0.875)  # 105 is left out


def _brute_force_probs(model, ids: list[int], digits: list[int]):
    """(p1, p2, p3) of the documented rule from full forward passes without any cache, one sequence
    at a time: p1 after the prompt, p2[d] after each kept first digit d, p3 after "10" (when 1 is kept)."""
    def next_probs(seq):
        with torch.inference_mode():
            return model(input_ids=torch.tensor([seq])).logits[0, -1].float().softmax(-1)[digits]

    p1 = next_probs(ids)
    firsts = [d for d in range(10) if p1[d] >= rating_logits.KEEP_DIGIT * p1.sum()]
    p2 = {d: next_probs(ids + [digits[d]]) for d in firsts}
    return p1, p2, next_probs(ids + [digits[1], digits[0]]) if 1 in firsts else None


def _brute_force_score(model, ids: list[int], digits: list[int]) -> float:
    probs = number_probs(*_brute_force_probs(model, ids, digits))
    return sum(v * p for v, p in probs.items()) / sum(probs.values())


def _sharp_tiny(vocab_size: int, digits: list[int]):
    """A tiny random model whose attention is sharp and whose digit logits are spread, so that a
    wrong position or mask moves its scores visibly (a plain random one hardly notices)."""
    model = tiny_llama(vocab_size, seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 6
            layer.self_attn.k_proj.weight *= 6
        model.lm_head.weight[digits] *= 60
    return model


def test_expected_score_matches_the_rule_computed_without_cache(tokenizer):
    digits = digit_ids(tokenizer)
    model = _sharp_tiny(len(tokenizer), digits)
    for text in ["Rate this: the answer is good.", "Score?"]:
        ids = tokenizer(text)["input_ids"]
        [(score, mass)] = expected_scores(model, [ids], digits)
        assert 0 <= score <= 100 and 0 < mass < 1
        assert score == pytest.approx(_brute_force_score(model, ids, digits), abs=1e-3)


@pytest.mark.parametrize("shared", [True, False])
def test_batched_scores_equal_those_of_one_prompt_at_a_time(tokenizer, monkeypatch, shared):
    """Prompts of different lengths prefilled in one padded batch (left of each prompt's own tokens)
    and continued together score as each alone does, with and without the shared start."""
    digits = digit_ids(tokenizer)
    model = _sharp_tiny(len(tokenizer), digits)
    start = tokenizer("Rate the pair below from 0 to 100. " * 12)["input_ids"]
    rash = "A rash that spreads: see a dermatologist the same week, and avoid scratching it."
    pairs = ["Flu: rest.", "Cough? See a doctor soon, and drink plenty of water.", rash, "Why?"]
    prompts = [start + tokenizer(text)["input_ids"] for text in pairs]
    prefix = shared_prefix(model, prompts) if shared else None
    assert (prefix is not None) == shared
    alone = [expected_scores(model, [ids], digits, prefix)[0] for ids in prompts]
    monkeypatch.setattr(rating_logits, "PAD_SLACK", 100.0)  # one batch however much padding it computes
    used, rule = [], rating_logits.number_probs
    monkeypatch.setattr(rating_logits, "number_probs", lambda *probs: used.append(probs) or rule(*probs))
    seen = []
    batched = expected_scores(model, prompts, digits, prefix, on_done=lambda i, *rest: seen.append(i))
    assert sorted(seen) == [0, 1, 2, 3] and len({len(p) for p in prompts}) == 4
    assert max(abs(a[0] - b[0]) for a, b in zip(alone, batched)) < 1e-4
    assert max(abs(a[1] - b[1]) for a, b in zip(alone, batched)) < 1e-6

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a, b, rtol=1e-4, atol=1e-8)

    for ids, (score, _) in zip(prompts, batched):
        p1, p2, p3 = _brute_force_probs(model, ids, digits)
        assert score == pytest.approx(_brute_force_score(model, ids, digits), abs=1e-3)
        _, got2, got3 = next(u for u in used if close(u[0], p1))  # every digit probability, not only the mean
        assert got2.keys() == p2.keys() and all(close(got2[d], p2[d]) for d in p2)
        assert p3 is not None and close(got3, p3)  # "10" continued: the "0" attends to its "1"


def test_prompt_batches_bound_rows_cache_and_padding():
    lengths = [22, 50, 48, 45, 21, 12]  # own tokens after a start of 10: 12, 40, 38, 35, 11, 2
    # padding within a tenth of the own tokens: 3 x 40 <= 1.1 x 113, 4 x 40 > 1.1 x 125; 3 x 12 > 1.1 x 25
    assert prompt_batches(lengths, 10, 64, 10**6) == [[1, 2, 3], [0, 4], [5]]
    assert prompt_batches(lengths, 10, 2, 10**6) == [[1, 2], [3], [0, 4], [5]]  # at most 2 rows
    # rows x (longest + 11 continuation columns) <= 120: 2 x 61 > 120, 2 x 59 <= 120
    assert prompt_batches(lengths, 10, 64, 120) == [[1], [2, 3], [0, 4], [5]]
    assert prompt_batches([7], 0, 1, 1) == [[0]] and prompt_batches([], 0, 8, 100) == []


def test_logits_mode_logs_scores_under_its_own_key_and_needs_a_local_backend(tmp_path, tiny_model_dir):
    from threeds.model.backends import OpenAIBackend

    records = [{"id": "a", "instruction": "What is flu?", "output": "A viral infection."},
               {"id": "b", "instruction": "Cough?", "output": "See a doctor."}]  # fmt: skip
    backend = LocalBackend(str(tiny_model_dir))
    log = tmp_path / "ratings.jsonl"
    summary = rate_records(records, backend, log, RateConfig(rating_mode="logits"), template="{instruction} {output} score:", progress=False)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert summary["new"] == 2 and [r["id"] for r in rows] == ["a", "b"]
    assert all(0 <= r["score"] <= 100 and json.loads(r["raw"])["score"] == r["score"] for r in rows)
    assert LogitsRater(backend).signature["rating_mode"] == "logits"
    from threeds.stages.joblog import StaleResultsError

    with pytest.raises(StaleResultsError):  # a generate-mode rerun never mixes into this log
        rate_records(records, backend, log, RateConfig(), template="{instruction} {output} score:", progress=False)
    with pytest.raises(RatingModeError, match="--backend local"):
        rate_records(records, OpenAIBackend("http://127.0.0.1:9/v1"), log, RateConfig(rating_mode="logits"), template="{instruction}{output}")


def test_replies_and_the_generate_log_say_whether_an_answer_was_cut_off(tmp_path, tiny_model_dir):
    from threeds.stages.generate import generate_records

    backend = LocalBackend(str(tiny_model_dir))
    prompts = ["What is flu?", "Cough?", "Why does a fever come back?"]
    replies = backend.chat(prompts, 4)
    model, tokenizer = backend.load()
    encoded, end_of_turn = backend.encode(prompts)
    from threeds.model.backends import _stop_ids

    lengths = [len(t) for t in greedy_decode(model, encoded, _stop_ids(tokenizer, end_of_turn), 4)]
    assert [r.finish for r in replies] == ["length" if n == 4 else "stop" for n in lengths]
    records = [{"id": str(i), "instruction": p, "output": "x"} for i, p in enumerate(prompts)]
    generate_records(records, backend, tmp_path / "gen.jsonl", 4, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [r["finish_reason"] for r in sorted(rows, key=lambda r: r["id"])] == [r.finish for r in replies]
