"""`--rating-mode logits`: a Stage-1 score read from the model's next-token distribution.

Instead of letting the model write a reply and parsing the first number in it, the rating prompt
is run once and the score is the expected value of the number the model would write first:

* p1(d): the probability that the reply's first token is the digit d (0-9). The mass on other
  tokens (e.g. "The") is left out and recorded as `digit_mass`.
* Each first digit with p1(d) >= 0.1% of the digit mass is continued by one more step on the
  prompt's cache (all of them in one batched call): p2(e | d) for a second digit e; any other
  token ends the number. "d" then a non-digit is the score d; "de" is 10 d + e ("0e" is e).
* "10" is continued once more: "100" is 100, "10" then a non-digit is 10, and "101".."109" (over
  100) are left out. A third digit after any other two is not looked at.
* The score is the expected value over 0-100 of these numbers' probabilities, renormalised to
  their sum.

This needs a tokenizer that writes each digit as its own token (SmolLM2, Qwen2/2.5, Llama 2,
Mistral); others are refused. The expectation breaks the ties a small model makes by writing
the same score for nearly every record.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from threeds.decode import Prefix, SlotLayer, prefill
from threeds.errors import SettingsError

KEEP_DIGIT = 1e-3  # first digits below this share of the digit mass are not continued


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


def _continue(model, kv: list, length: int, firsts: list[int], digits: list[int]) -> torch.Tensor:
    """Probabilities [len(firsts), 2, vocab] after feeding each first digit, then "0"."""
    rows = len(firsts)
    cache = Cache(layers=[SlotLayer.holding(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), 2) for k, v in kv])
    ids = torch.tensor([[digits[d], digits[0]] for d in firsts], device=model.device)
    positions = torch.tensor([[length, length + 1]] * rows, device=model.device)
    out = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=2)
    return out.logits.float().softmax(-1)


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


def expected_score(
    model, ids: Sequence[int], digits: list[int], prefix: Prefix | None = None
) -> tuple[float, float]:
    """(expected score 0-100, probability that the reply starts with a digit) for one prompt."""
    with torch.inference_mode():
        logits, kv = prefill(model, ids, prefix)
        p1 = logits.float().softmax(-1)[digits]
        mass = float(p1.sum())
        firsts = [d for d in range(10) if p1[d] >= KEEP_DIGIT * mass]
        probs = _continue(model, kv, len(ids), firsts, digits)
    p2 = {d: probs[row, 0, digits] for row, d in enumerate(firsts)}
    p3 = probs[firsts.index(1), 1, digits] if 1 in firsts else None
    numbers = number_probs(p1, p2, p3)
    return sum(v * p for v, p in numbers.items()) / sum(numbers.values()), mass
