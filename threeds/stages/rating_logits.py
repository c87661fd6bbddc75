"""`--rating-mode logits`: a Stage-1 score read from the model's next-token distribution.

Instead of letting the model write a reply and parsing the first number in it, the rating prompt
is run once and the score is the expected value of the number the model would write first:

* p1(d): the probability that the reply's first token is the digit d (0-9). The mass on other
  tokens (e.g. "The") is left out and recorded as `digit_mass`.
* Each first digit with p1(d) >= 0.1% of the digit mass is continued by one more step on the
  prompt's cache: p2(e | d) for a second digit e; any other token ends the number. "d" then a
  non-digit is the score d; "de" is 10 d + e ("0e" is e).
* "10" is continued once more: "100" is 100, "10" then a non-digit is 10, and "101".."109" (over
  100) are left out. A third digit after any other two is not looked at.
* The score is the expected value over 0-100 of these numbers' probabilities, renormalised to
  their sum.

Prompts of similar length are prefilled together, and every candidate first digit of every prompt
of a batch, and "10", are continued in one more forward (a tree of continuations on the batch's one
cache, told apart by the attention mask), so the cache is never copied per candidate.

This needs a tokenizer that writes each digit as its own token (SmolLM2, Qwen2/2.5, Llama 2,
Mistral); others are refused. The expectation breaks the ties a small model makes by writing
the same score for nearly every record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

from threeds.errors import SettingsError
from threeds.model.decode import Prefix

KEEP_DIGIT = 1e-3  # first digits below this share of the digit mass are not continued
PAD_SLACK = 1.1  # a prefill batch computes at most this many tokens per token of its prompts


class RatingModeError(SettingsError):
    """Logits rating cannot be used with this tokenizer or backend; the message says why."""


def digit_ids(tokenizer) -> list[int]:
    """Token ids of "0".."9", each digit a single token, or RatingModeError."""
    ids = []
    for d in range(10):
        encoded = tokenizer.encode(str(d), add_special_tokens=False)
        if len(encoded) != 1 or len(tokenizer.encode(f"{d}{d}", add_special_tokens=False)) != 2:
            raise RatingModeError("--rating-mode logits needs a tokenizer that writes each digit as one token; "
                                  "this one does not: use --rating-mode generate")  # fmt: skip
        ids.append(encoded[0])
    return ids


def number_probs(p1: torch.Tensor, p2: dict[int, torch.Tensor], p3: torch.Tensor | None) -> dict[int, float]:
    """Probability of each score 0-100 the model may write, from the digit probabilities: `p1[d]`
    of the first digit, `p2[d][e]` of a second digit after d, `p3[e]` of a third digit after "10"."""
    probs = dict.fromkeys(range(101), 0.0)
    for d, after in p2.items():
        first = float(p1[d])
        probs[d] += first * max(0.0, 1.0 - float(after.sum()))  # a non-digit ends the number
        for e in range(10):
            if (d, e) == (1, 0) and p3 is not None:
                probs[10] += first * float(after[0]) * max(0.0, 1.0 - float(p3.sum()))
                probs[100] += first * float(after[0]) * float(p3[0])
            else:
                probs[10 * d + e if d else e] += first * float(after[e])
    return probs


OnScore = Callable[[int, float, float, float], None]


def expected_scores(
    model, inputs: Sequence[Sequence[int]], digits: list[int], prefix: Prefix | None = None, *,
    batch_tokens: int = 32768, max_rows: int = 64, on_done: OnScore | None = None,
) -> list[tuple[float, float]]:  # fmt: skip
    """(expected score 0-100, probability that the reply starts with a digit) for every prompt.

    Prompts of similar length are prefilled together on top of the shared `prefix` (`prompt_batches`),
    then every candidate first digit of every prompt in the batch is continued in one more forward.
    `on_done(index, score, digit_mass, seconds)` is called as each batch finishes; `seconds` is the
    batch's wall time shared equally by its prompts.
    """
    start = prefix.length if prefix is not None else 0
    results: list[tuple[float, float] | None] = [None] * len(inputs)
    for batch in prompt_batches([len(ids) for ids in inputs], start, max_rows, batch_tokens):
        began = time.perf_counter()
        with torch.inference_mode():
            scores = _score_batch(model, [inputs[i] for i in batch], digits, prefix)
        seconds = (time.perf_counter() - began) / len(batch)
        for i, result in zip(batch, scores):
            results[i] = result
            if on_done:
                on_done(i, *result, seconds)
    return results  # type: ignore[return-value]


def prompt_batches(lengths: Sequence[int], start: int, max_rows: int, batch_tokens: int) -> list[list[int]]:
    """Indices per prefill batch, longest first. A batch takes the next prompt while it stays within
    `max_rows`, rows x (longest prompt + the continuation's columns) stays within `batch_tokens` (the
    key/value cache), and the padding it computes stays within a tenth of its own tokens after
    `start`; every batch holds at least one prompt."""
    batches: list[list[int]] = []
    own = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches:
            batch = batches[-1]
            rows, widest = len(batch) + 1, lengths[batch[0]]
            if (rows <= max_rows and rows * (widest + 11) <= batch_tokens
                    and rows * (widest - start) <= PAD_SLACK * (own + lengths[i] - start)):  # fmt: skip
                batch.append(i)
                own += lengths[i] - start
                continue
        batches.append([i])
        own = lengths[i] - start
    return batches


def _score_batch(model, prompts: list[Sequence[int]], digits: list[int], prefix: Prefix | None) -> list[tuple[float, float]]:
    """(score, digit mass) of each prompt of one batch: one prefill, one continuation."""
    logits, cache, real = _prefill_batch(model, prompts, prefix)
    p1 = logits.float().softmax(-1)[:, digits]
    masses = p1.sum(-1)
    firsts = [[d for d in range(10) if p1[r, d] >= KEEP_DIGIT * masses[r]] for r in range(len(prompts))]
    probs = _continue(model, cache, real, [len(ids) for ids in prompts], firsts, digits)
    out = []
    for r, row_firsts in enumerate(firsts):
        p2 = {d: probs[r, j] for j, d in enumerate(row_firsts)}
        p3 = probs[r, -1] if 1 in row_firsts else None
        numbers = number_probs(p1[r], p2, p3)
        out.append((sum(v * p for v, p in numbers.items()) / sum(numbers.values()), float(masses[r])))
    return out


def _prefill_batch(model, prompts: list[Sequence[int]], prefix: Prefix | None):
    """(next-token logits [rows, vocab], the cache, which of its columns hold real tokens [rows, width]).

    Each prompt's own tokens (those after the prefix) end at the last column; shorter ones are padded
    on the left of them. A real token attends to the prefix and its own earlier tokens, a pad to the
    prefix and itself (so no row of the mask is empty), and no real token attends to a pad."""
    start = prefix.length if prefix is not None else 0
    rows, width = len(prompts), max(len(ids) for ids in prompts) - start
    device = model.device
    cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(prefix.kv if prefix is not None else []):
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)
    pads = torch.tensor([width - (len(ids) - start) for ids in prompts], device=device)
    column = torch.arange(width, device=device)
    real = torch.cat([torch.ones(rows, start, dtype=torch.bool, device=device), column >= pads[:, None]], 1)
    ids = torch.tensor([[ids[start]] * (width - len(ids) + start) + list(ids[start:]) for ids in prompts], device=device)
    positions = (start + column - pads[:, None]).clamp(min=start)
    allowed = real[:, None, :] & (torch.arange(start + width, device=device) <= start + column[:, None])
    allowed[:, :, start:] |= torch.eye(width, dtype=torch.bool, device=device)
    out = model(input_ids=ids, position_ids=positions, attention_mask=_additive(allowed, model.dtype),
                past_key_values=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
    return out.logits[:, -1], cache, real


def _continue(model, cache, real: torch.Tensor, lengths: list[int], firsts: list[list[int]], digits: list[int]) -> torch.Tensor:
    """Digit probabilities [rows, k + 1, 10] from one forward over k + 1 new tokens per row (k: the
    most first digits of a row): at j < k after the row's j-th first digit, at k after "1" then "0".

    The new tokens form a tree on the prompt's cache, which is never copied: each first digit sits
    at the prompt's next position and attends to the prompt and itself; the "0" sits one further
    and attends also to the "1". A row with fewer first digits, or without "1", gets "0"s that only
    attend to the prompt and themselves, and whose output is not read."""
    rows, k = len(firsts), max(map(len, firsts))
    device = model.device
    ids = torch.tensor([[digits[d] for d in f] + [digits[0]] * (k + 1 - len(f)) for f in firsts], device=device)
    positions = torch.tensor(lengths, device=device)[:, None] + (torch.arange(k + 1, device=device) == k)
    tree = torch.eye(k + 1, dtype=torch.bool, device=device).repeat(rows, 1, 1)
    for r, f in enumerate(firsts):
        if 1 in f:
            tree[r, k, f.index(1)] = True
    allowed = torch.cat([real[:, None, :].expand(-1, k + 1, -1), tree], 2)
    out = model(input_ids=ids, position_ids=positions, attention_mask=_additive(allowed, model.dtype),
                past_key_values=cache, use_cache=True)  # fmt: skip
    return out.logits.float().softmax(-1)[:, :, digits]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, 1, queries, keys] mask to add to attention scores (eager and SDPA both take it)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
