"""A sample's "why" (`threeds.selection.apply.reasons`, e.g. "Response Confidence below the 25th
percentile") in plain words: what the rule says about the sample as training data.

3DS keeps the samples of middling difficulty for the model being tuned (docs/SPEC-3DS.md): below a
band the model already handles the sample (little to learn), above it the sample is too hard or
likely noisy; the meanings below say that per metric and per rule.
"""

from __future__ import annotations

from threeds.names import ANSWER_FLAG_NAMES, METRIC_NAMES

# Per metric: what lying below / above its band means for the sample.
BELOW_ABOVE = {
    "ins_ppl": ("the model already reads this instruction easily: little to learn from it",
                "the instruction puzzles the model (odd or garbled wording): more likely noise than a lesson"),
    "gen_wloss": ("the model already answers this confidently: little to learn from it",
                  "the model is unsure of its own answer: likely too hard to learn from one example"),
    "gt_wloss": ("the model would already give the reference answer: little to learn from it",
                 "the reference answer is far from what the model expects: too hard, or a noisy answer"),
}  # fmt: skip
FLAG_MEANINGS = {
    "hit_max": "the model's own answer was cut off, so its confidence says little",
    "repeats": "the model's own answer loops, so its confidence says little",
    "empty": "the model gave no answer, so its confidence says nothing",
}


def _meanings() -> list[tuple[str, str]]:
    """(start of a reason, its meaning), most specific first."""
    found = [
        ("always include (rule)", "you chose to always include it"),
        ("excluded by rule", "you chose to exclude it"),
        ("not rated", "the rater gave it no score, so its quality is unknown"),
        ("quality ", "rated below the quality threshold: a weak example"),
        ("in all bands", ""),  # said by the next part
        ("not among the", "right difficulty, but the picks before it already cover its part of the data"),
        ("k-center pick", "right difficulty, and unlike the samples picked before it"),
        ("the k-center picks are being made", "right difficulty; whether it is picked is known once k-center is done"),
    ]
    for metric, (below, above) in BELOW_ABOVE.items():
        name = METRIC_NAMES[metric]
        found += [(f"{name} below", below), (f"{name} above", above), (f"{name}: no value", "this metric could not be measured")]
    found += [(f"A' {ANSWER_FLAG_NAMES[flag]}", meaning) for flag, meaning in FLAG_MEANINGS.items()]
    return found


MEANINGS = _meanings()


def explained(why: str) -> list[tuple[str, str]]:
    """Each part of a "why" (joined by '; ') with what it means for the sample ('' for a part the
    next one says, like "in all bands")."""
    return [(part, next((meaning for start, meaning in MEANINGS if part.startswith(start)), "")) for part in why.split("; ")]


def in_plain_words(why: str) -> str:
    """What a "why" means for the sample, its parts' meanings in order (a table's column)."""
    return "; ".join(dict.fromkeys(meaning for _, meaning in explained(why) if meaning))
