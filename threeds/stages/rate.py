"""Stage 1: the target model rates each (instruction, answer) pair 0-100; keep the high ones.

A reply is trusted only if a score can be read from it: a reply without one is asked again with a
reminder, then recorded as a failure with its raw text, never as a score of 0.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from threeds.config import FilterConfig, RateConfig
from threeds.errors import ThreedsError
from threeds.io.data import full_instruction
from threeds.model.backends import Backend, LocalBackend, OnReply, Reply
from threeds.model.function_words import detect_language
from threeds.selection.quality import quality_mask
from threeds.stages.joblog import Check, Job, make_tasks, run_job

log = logging.getLogger(__name__)

PROMPT_NAMES = ("en-medical", "zh-medical", "general")
SLOTS = re.compile(r"\{(instruction|output)\}")
REMINDER = "\n\nYour last reply had no score. Answer with one whole number from 0 to 100 and nothing else."
NO_SCORE = "no score from 0 to 100 in the reply"

# A number not glued to other digits or a decimal point.
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?![\d])")
# A label right before the score: "Score: 85", "rating of 85", "评分：85".
_LABELLED = re.compile(r"(?:score|rating|评分|分数|得分|打分|总分)[^\d\n]{0,12}?((?<![\d.])\d+(?:\.\d+)?(?![\d]))", re.I)
# A mention of the scale itself, e.g. "(0-100)", "0 to 100", "0～100", or one cut off: "from 0 to".
_SCALE = re.compile(r"(?<![\d.])0\s*(?:-|–|—|~|to|到|至)\s*(?:100(?![\d.])|$)", re.I)
# A list marker: "1. ", "2) " at the start of a line, followed by more text.
_ENUMERATOR_AFTER = re.compile(r"[.)、]\s+\S")
_DENOMINATOR_AFTER = re.compile(r"\s*(?:/|out of|满分)\s*(\d+(?:\.\d+)?)", re.I)
_DENOMINATOR_BEFORE = re.compile(r"(?:/|out of|满分)\s*$", re.I)


class PromptError(ThreedsError, ValueError):
    """The rating prompt cannot be used; the message says why."""


def prompt_for_language(records: Sequence[dict], sample: int = 200) -> str:
    """The rating prompt for the data's language: zh-medical, the paper's setting, for Chinese
    data, en-medical otherwise; judged on the first `sample` records."""
    text = "\n".join(f"{full_instruction(r)}\n{r.get('output', '')}" for r in records[:sample])
    return "zh-medical" if detect_language(text) == "zh" else "en-medical"


def rating_prompt_name(prompt: str, records: Sequence[dict]) -> str:
    """`--prompt` as given, or for `auto` the prompt of the data's language (logged)."""
    if prompt != "auto":
        return prompt
    chosen = prompt_for_language(records)
    log.info("rating prompt: %s (from the data's language; --prompt sets another)", chosen)
    return chosen


def load_rating_prompt(name_or_path: str) -> str:
    """A shipped prompt by name, or a user file holding `{instruction}` and `{output}`."""
    if name_or_path in PROMPT_NAMES:
        return resources.files("threeds").joinpath("rating_prompts", f"{name_or_path}.txt").read_text(encoding="utf-8")
    path = Path(name_or_path)
    if not path.is_file():
        raise PromptError(f"--prompt {name_or_path}: not one of {list(PROMPT_NAMES)} and no such file")
    text = path.read_text(encoding="utf-8")
    missing = {"instruction", "output"} - set(SLOTS.findall(text))
    if missing:
        raise PromptError(f"{path}: the prompt lacks the slot(s) {sorted('{' + m + '}' for m in missing)}")
    return text


def render(template: str, rec: dict) -> str:
    """Fill both slots in one pass, so braces in the template or the record are left alone."""
    values = {"instruction": full_instruction(rec), "output": rec["output"]}
    return SLOTS.sub(lambda m: values[m.group(1)], template)


def parse_score(text: str | None) -> float | None:
    """The score in a reply, or None if there is none in 0..100.

    Full-width characters are folded first ("８５" -> "85"). A labelled number ("Score: 85") wins;
    otherwise the first number in 0..100. "85/100" and "85 out of 100" give 85; a number out of
    another maximum ("7/10"), the scale itself ("0-100") and list markers ("1. ...") are not scores.
    """
    if not text:
        return None
    text = _SCALE.sub(" ", unicodedata.normalize("NFKC", text))
    for match in _LABELLED.finditer(text):
        if (value := _candidate(text, match.start(1), match.end(1))) is not None:
            return value
    for match in _NUMBER.finditer(text):
        if (value := _candidate(text, match.start(), match.end())) is not None:
            return value
    return None


def _candidate(text: str, start: int, end: int) -> float | None:
    if _DENOMINATOR_BEFORE.search(text[:start]):
        return None  # the "100" of "85/100"
    if not text[text.rfind("\n", 0, start) + 1 : start].strip() and _ENUMERATOR_AFTER.match(text, end):
        return None  # "1. Question: ..." numbers a list
    out_of = _DENOMINATOR_AFTER.match(text, end)
    if out_of and float(out_of.group(1)) != 100:
        return None
    value = float(text[start:end])
    return value if 0 <= value <= 100 else None


def _rating_fields(reply: Reply) -> dict:
    if reply.error is not None:
        return {"score": None, "raw": reply.text, "error": reply.error}
    score = parse_score(reply.text)
    return {"score": score, "raw": reply.text, "error": None if score is not None else NO_SCORE}


def rating_job(reasks: int) -> Job:
    return Job("rate", _rating_fields, reask=lambda prompt: prompt + REMINDER, reasks=reasks)


class LogitsRater:
    """`--rating-mode logits` in the place of a backend: each "reply" is the expected score read
    from the next-token distribution (threeds.stages.rating_logits), as JSON {score, digit_mass}."""

    def __init__(self, backend: Backend) -> None:
        from threeds.stages.rating_logits import RatingModeError

        if not isinstance(backend, LocalBackend):
            raise RatingModeError("--rating-mode logits reads the model's own probabilities: it needs --backend local")
        self.backend, self.name = backend, backend.name

    @property
    def label(self) -> str:
        return self.backend.label

    def load(self):
        return self.backend.load()

    @property
    def signature(self) -> dict:
        return self.backend.signature | {"rating_mode": "logits"}  # a log never mixes the two modes

    def chat(self, prompts: Sequence[str], max_new_tokens: int, on_reply: OnReply | None = None) -> list[Reply]:
        """Scores in batches of prompts of similar length (the backend's --batch-size and
        --gen-batch-tokens bound them); each reply is reported as its batch finishes."""
        import torch

        from threeds.model.decode import shared_prefix
        from threeds.stages.rating_logits import digit_ids, expected_scores

        model, tokenizer = self.backend.load()
        digits = digit_ids(tokenizer)
        encoded, _ = self.backend.encode(prompts)
        with torch.inference_mode():
            prefix = shared_prefix(model, encoded)
        replies: list[Reply | None] = [None] * len(prompts)

        def done(i: int, score: float, mass: float, seconds: float) -> None:
            text = json.dumps({"score": round(score, 4), "digit_mass": round(mass, 4)})
            replies[i] = Reply(text, seconds, model=self.label)
            if on_reply:
                on_reply(i, replies[i])

        expected_scores(model, encoded, digits, prefix, batch_tokens=self.backend.batch_tokens,
                        max_rows=self.backend.batch_size, on_done=done)  # fmt: skip
        return replies


def _logits_fields(reply: Reply) -> dict:
    if reply.error is not None:
        return {"score": None, "raw": reply.text, "error": reply.error}
    return {"score": json.loads(reply.text)["score"], "raw": reply.text, "error": None}


def rate_records(
    records: Sequence[dict], backend: Backend, out_path: Path, config: RateConfig = RateConfig(),
    *, template: str | None = None, overwrite: bool = False, progress: bool = True, progress_path: Path | None = None,
    check_first: tuple[int, Check] | None = None,
) -> dict:  # fmt: skip
    """Rate every record not yet rated into `out_path` (ratings JSONL); returns the summary.

    `template`: the rating prompt's text (default: the prompt `config.prompt` names for these records).
    Rating mode "generate" parses the score the model writes (the paper's method); "logits" reads it
    from one pass over the prompt (threeds.stages.rating_logits), keyed apart so the log never mixes them.
    `check_first`: the preflight (`threeds.stages.joblog.run_job`).
    """
    if template is None:
        template = load_rating_prompt(rating_prompt_name(config.prompt, records))
    job, tokens = rating_job(config.reasks), config.max_new_tokens
    if config.rating_mode == "logits":
        backend, job = LogitsRater(backend), Job("rate", _logits_fields)
    elif config.rating_mode != "generate":
        raise ValueError(f"rating mode must be generate or logits, got {config.rating_mode!r}")
    tasks = make_tasks(records, [render(template, r) for r in records], backend, tokens)
    return run_job(job, tasks, backend, Path(out_path), tokens, overwrite=overwrite,
                   progress=progress, progress_path=progress_path, check_first=check_first)  # fmt: skip


def filter_by_rating(
    records: Sequence[dict], ratings: Sequence[dict], threshold: float = FilterConfig.quality_threshold,
) -> tuple[list[dict], dict]:  # fmt: skip
    """(records scored >= threshold, report). Records without a valid rating are left out and counted."""
    scores = {r["id"]: r["score"] for r in ratings if r.get("score") is not None}
    keep = quality_mask([scores.get(r["id"], np.nan) for r in records], threshold)
    kept = [r for r, k in zip(records, keep) if k]
    unrated = sum(r["id"] not in scores for r in records)
    report = {"quality_threshold": threshold, "total": len(records), "kept": len(kept),
              "below": len(records) - len(kept) - unrated, "unrated": unrated}  # fmt: skip
    return kept, report
