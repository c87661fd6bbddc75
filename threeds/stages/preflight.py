"""Preflight: the first records of a run, tried before the long work (issue 25).

Rating starts with `PREFLIGHT_RECORDS` records on their own (their rows are the run's own, kept in
the log); when none of them gives a rating, the run stops with one line naming the likely cause
instead of asking the model for every record (the Chinese sample on the English 135M model: 9 of 10
ratings failed, 36 minutes later). Then the model is asked for a short A' to the same records
(`PROBE_TOKENS` tokens, not logged): when none comes back, the run stops too. `--no-preflight`
skips both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from threeds.errors import ThreedsError
from threeds.io.data import full_instruction
from threeds.model.backends import Backend

PREFLIGHT_RECORDS = 2
PROBE_TOKENS = 32  # enough to see an answer start; the real A' is asked later, up to --max-new-tokens
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
SKIP = "--no-preflight runs anyway"


class PreflightError(ThreedsError):
    """The first records showed the run cannot work with these settings; the message says why."""


def check_ratings(rows: Sequence[dict], prompt: str, template: str, no_score: str) -> None:
    """Stop (PreflightError) when none of the first records' ratings could be read; `rows` are their
    final log rows, `no_score` the error of a reply without a score."""
    if not rows or any(r["error"] is None for r in rows):
        return
    first = rows[0]
    said = f"; the first, {first['id']}, replied {first.get('raw', '')[:120]!r}" if first.get("raw") is not None else ""
    if all(r["error"] == no_score for r in rows):
        cause = _rating_cause(rows, prompt, template)
        raise PreflightError(f"preflight: no rating could be read from the model's replies to the first {len(rows)} "
                             f"records (rating prompt {prompt}){said}; likely cause: {cause}; {SKIP}")  # fmt: skip
    raise PreflightError(f"preflight: the first {len(rows)} ratings failed ({first['id']}: {first['error']}); "
                         f"check the model and its settings; {SKIP}")  # fmt: skip


def _rating_cause(rows: Sequence[dict], prompt: str, template: str) -> str:
    replies = [r.get("raw") or "" for r in rows]
    if not any(text.strip() for text in replies):
        return "the model replies with nothing to the rating prompt; check --template and --system"
    if _CJK.search(template) and not any(_CJK.search(text) for text in replies):
        return (f"the rating prompt {prompt} is Chinese and the model answers in another language, so it likely does "
                "not read Chinese: use a model trained on Chinese, or --prompt en-medical")  # fmt: skip
    return ("the model does not answer in the prompt's format (a small or base model?): use a larger "
            "instruction-tuned model, another --prompt, or --rating-mode logits with --backend local")


def probe_answers(records: Sequence[dict], backend: Backend, max_new_tokens: int) -> None:
    """Ask for a short A' to `records` (not logged); stop when none comes back."""
    if not records:
        return
    replies = backend.chat([full_instruction(r) for r in records], min(max_new_tokens, PROBE_TOKENS))
    if any(r.error is None and (r.text or "").strip() for r in replies):
        return
    why = next((r.error for r in replies if r.error), None) or "every reply was empty"
    raise PreflightError(f"preflight: the model wrote no answer (A') to the first {len(records)} instructions "
                         f"({why}); check --model, --template and --system; {SKIP}")  # fmt: skip
