"""`threeds eval`: multiple choice by log-likelihood, no generation, resumable.

Per item, every choice's text is scored as the continuation of one prompt (`threeds.outcomes.loglik`:
the prompt is computed once for all choices): `logprobs` are the summed log-probabilities of the
continuation tokens; `pred` is their argmax (`acc`); `pred_norm` the argmax of the log-probability
per character of the choice's text (`acc_norm`); `probs` the softmax of those per-character scores
and `gold_prob` its value at the gold choice (a continuous metric that separates small models
long before accuracy does).

Prompt formats (README, "threeds eval"), K-shot examples from the set's dev items (same subject
first, in file order):

* `chat` (default): the model's chat template (and `--template`/`--system`), one user turn
  `[context "\\n\\n"] question`, the generation prompt; each shot is a user turn and an assistant turn
  holding the gold choice. The continuation is the choice's text as the assistant's reply.
  A tokenizer without a chat template falls back to `plain`, and the summary says so.
* `plain`: `[Context: context\\n]Question: question\\nAnswer:`, shots as the same block with the gold
  choice after `Answer: ` and a blank line; the continuation is `" " + choice`.
* `letters`: lm-evaluation-harness's default MMLU prompt: a description line `The following are
  multiple choice questions (with answers) about {subject}.\\n\\n` (the subject's underscores as
  spaces; none for an item without a subject), then per shot and for the item `question\\nA.
  choice\\nB. choice ...\\nAnswer:`, a shot followed by `" " + its gold letter + "\\n\\n"`; the
  continuations are `" A"`, `" B"`, .... An item with a context (PubMedQA's abstract) starts its
  block with `Abstract: context\\nQuestion: ` as the harness's PubMedQA task does, and has no
  description line. Its acc_norm equals acc: every continuation is one letter long. The harness's
  own 0- and 5-shot MMLU requests are the same strings (`bench/lmeval_prompts.py`) but for an option
  with surrounding spaces, which threeds strips and the harness keeps (one of MMLU-medical's 1,089
  test items).

acc_norm divides by the length of the choice as the harness counts it: the continuation without
its leading space.

Files in `out`: `config.json` (what the rows depend on; a rerun with other settings is refused),
`items.jsonl` (one row per item, appended after each batch, so a killed run resumes), and
`summary.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from threeds.config import EvalConfig, ModelConfig, check_settings
from threeds.errors import SettingsError, ThreedsError
from threeds.io.data import DataError, append_jsonl, read_jsonl, write_json, write_jsonl
from threeds.io.lock import locked
from threeds.model.files import model_label
from threeds.model.prompts import PromptFormat
from threeds.model.prompts import prompt_format as make_prompt_format
from threeds.outcomes.benchsets import LETTERS, Bench, BenchItem
from threeds.outcomes.loglik import Request, choice_logprobs
from threeds.rundir import layout
from threeds.rundir.check import read_json_object
from threeds.rundir.progress import Progress, TerminalBar


class EvalSettingsError(ThreedsError):
    """The output folder holds an evaluation made with other settings."""


class NonFiniteError(ThreedsError):
    """The model gave a NaN or infinite log-probability: there is no answer to record."""


# --------------------------------------------------------------------------- prompts


def check_shots(bench: Bench, k: int) -> None:
    """SettingsError when `bench` has fewer dev items than K shots ask for (checked before any model loads)."""
    if k > len(bench.dev):
        raise SettingsError(f"--shots {k}: the set {bench.name} has only {len(bench.dev)} dev items")


def shots_for(item: BenchItem, dev: list[BenchItem], k: int) -> list[BenchItem]:
    """The K dev items shown before `item`: its subject's first, then others, in file order."""
    if k <= 0:
        return []
    if k > len(dev):
        raise SettingsError(f"--shots {k}: the set has only {len(dev)} dev items")
    same = [d for d in dev if d.subject == item.subject]
    return (same + [d for d in dev if d.subject != item.subject])[:k]


def render(item: BenchItem, fmt: str, shots: list[BenchItem], chat: PromptFormat | None) -> tuple[str, list[str]]:
    """(the prompt text, the continuation text of each choice) in format `fmt` (module docstring)."""
    if fmt == "plain":
        blocks = [_plain_block(s) + " " + s.choices[s.gold] + "\n\n" for s in shots]
        return "".join(blocks) + _plain_block(item), [" " + c for c in item.choices]
    if fmt == "letters":
        blocks = [_lettered_block(s) + " " + LETTERS[s.gold] + "\n\n" for s in shots]
        return _description(item) + "".join(blocks) + _lettered_block(item), [" " + LETTERS[i] for i in range(len(item.choices))]
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": _user_text(s)}, {"role": "assistant", "content": s.choices[s.gold]}]
    messages.append({"role": "user", "content": _user_text(item)})
    if chat.system is not None:
        messages.insert(0, {"role": "system", "content": chat.system})
    text = chat.tokenizer.apply_chat_template(messages, chat_template=chat.template, tokenize=False,
                                              add_generation_prompt=True)  # fmt: skip
    return text, list(item.choices)


def _plain_block(item: BenchItem) -> str:
    context = f"Context: {item.context}\n" if item.context else ""
    return f"{context}Question: {item.question}\nAnswer:"


def _description(item: BenchItem) -> str:
    """The harness's MMLU description line, naming the item's subject (none with a context or no subject)."""
    if item.context or not item.subject:
        return ""
    return f"The following are multiple choice questions (with answers) about {item.subject.replace('_', ' ')}.\n\n"


def _lettered_block(item: BenchItem) -> str:
    question = f"Abstract: {item.context}\nQuestion: {item.question}" if item.context else item.question
    options = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
    return f"{question}{options}\nAnswer:"


def _user_text(item: BenchItem) -> str:
    return f"{item.context}\n\n{item.question}" if item.context else item.question


def item_tokens(request: Request) -> int:
    """Tokens an item puts through the model (its prompt and every choice): what its time is proportional to."""
    return len(request.prompt) + sum(map(len, request.choices))


def encode(tokenizer, prompt: str, continuations: list[str], fmt: str) -> Request:
    """Token ids of the prompt and of each continuation as it is tokenized after the prompt (the
    tail of `prompt + continuation` when the prompt's tokens are its head, else on its own)."""
    special = fmt != "chat"  # a chat template writes its own BOS, a plain prompt gets the tokenizer's
    head = tokenizer.encode(prompt, add_special_tokens=special)
    choices = []
    for cont in continuations:
        whole = tokenizer.encode(prompt + cont, add_special_tokens=special)
        tail = whole[len(head):] if whole[: len(head)] == head else []
        choices.append(tail or tokenizer.encode(cont, add_special_tokens=False))
    return Request(head, choices)


def resolve_format(tokenizer, fmt: str) -> str:
    """`fmt` (one of config.PROMPT_FORMATS), but `plain` for `chat` when the tokenizer has no chat template."""
    return fmt if fmt != "chat" or getattr(tokenizer, "chat_template", None) else "plain"


# --------------------------------------------------------------------------- rows and summary


def item_row(item: BenchItem, prompt: str, continuations: list[str], logprobs: list[float], seconds: float) -> dict:
    """One items.jsonl row; NonFiniteError when a log-probability is NaN or infinite (no answer is made of it)."""
    bad = next((j for j, lp in enumerate(logprobs) if not isinstance(lp, (int, float)) or not math.isfinite(lp)), None)
    if bad is not None:
        raise NonFiniteError(f"item {item.id}: the model gave choice {LETTERS[bad] if bad < len(LETTERS) else bad + 1} "
                             f"a log-probability of {logprobs[bad]}: its weights (or the adapter's) hold NaN or inf, "
                             "as a training that diverged leaves them; no answer is recorded for it")  # fmt: skip
    norm = [lp / max(1, len(c.removeprefix(" "))) for lp, c in zip(logprobs, continuations, strict=True)]
    top = max(norm)
    weights = [math.exp(v - top) for v in norm]
    probs = [w / sum(weights) for w in weights]
    pred, pred_norm = _argmax(logprobs), _argmax(norm)
    return {
        "id": item.id, "subject": item.subject, "gold": item.gold, "pred": pred, "correct": pred == item.gold,
        "pred_norm": pred_norm, "correct_norm": pred_norm == item.gold, "gold_prob": probs[item.gold],
        "probs": [round(p, 6) for p in probs], "prompt": prompt, "choices": continuations, "logprobs": logprobs,
        "seconds": seconds,
    }  # fmt: skip


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def majority_acc(golds: list[int]) -> float:
    """Accuracy of always answering the most common gold position (PubMedQA: always "yes")."""
    return Counter(golds).most_common(1)[0][1] / len(golds) if golds else float("nan")


def summarize_rows(rows: list[dict], settings: dict) -> dict:
    """summary.json: the means over `rows`, per subject too, and the settings."""
    n = len(rows)

    def mean(key: str, part: list[dict]) -> float:
        return sum(float(r[key]) for r in part) / len(part) if part else float("nan")

    subjects = {}
    for subject in sorted({r["subject"] for r in rows}):
        part = [r for r in rows if r["subject"] == subject]
        subjects[subject] = {"n_items": len(part), "acc": mean("correct", part), "acc_norm": mean("correct_norm", part),
                             "gold_prob": mean("gold_prob", part)}  # fmt: skip
    return {
        "bench": settings["bench"], "n_items": n, "acc": mean("correct", rows), "acc_norm": mean("correct_norm", rows),
        "gold_prob": mean("gold_prob", rows), "majority_acc": majority_acc([r["gold"] for r in rows]),
        "model": settings["model"], "adapter": settings["adapter"], "prompt_format": settings["prompt_format"],
        "shots": settings["shots"], "seconds": sum(float(r.get("seconds", 0.0)) for r in rows), "subjects": subjects,
    }  # fmt: skip


# --------------------------------------------------------------------------- running


def evaluate(
    model, tokenizer, bench: Bench, out: str | os.PathLike, config: EvalConfig, spec: ModelConfig | None = None, *,
    progress: bool | Progress | None = None, overwrite: bool = False,
) -> dict:  # fmt: skip
    """Evaluate a loaded model (`load_model(spec, config.adapter, dtype)`, or one just trained) on
    `bench` (`load_bench(config.bench, config.limit)`); writes `out`'s files and returns the summary.

    `spec` names the model, its template and system prompt in the files (None: the model's own
    name, its tokenizer's template). Items already in `out/items.jsonl` are not scored again.
    `progress`: True for a bar on stderr, or a `Progress` (told items and tokens done)."""
    check_settings(config)  # a config built in code: the CLI checked its flags already
    spec = spec or ModelConfig(model=str(getattr(model.config, "_name_or_path", "")))
    template, system, shots = spec.template, spec.system, config.shots
    out = Path(out)
    fmt = resolve_format(tokenizer, config.prompt_format)
    chat = make_prompt_format(tokenizer, template, system) if fmt == "chat" else None
    settings = {"bench": bench.name, "model": model_label(spec.model), "adapter": config.adapter, "prompt_format": fmt,
                "shots": shots, "template": template, "system": system}  # fmt: skip
    rendered = {item.id: render(item, fmt, shots_for(item, bench.dev, shots), chat) for item in bench.items}
    with locked(out):
        done = _resume(out, settings, rendered, {item.id: item for item in bench.items}, overwrite)
        todo = [item for item in bench.items if item.id not in done]
        encoded = {item.id: encode(tokenizer, *rendered[item.id], fmt) for item in bench.items}
        requests = [encoded[item.id] for item in todo]
        check_context(bench.name, todo, requests, getattr(model.config, "max_position_embeddings", None))
        # an item's work is its tokens: items run longest first, so counting items would overstate the time left
        work = {key: item_tokens(req) for key, req in encoded.items()}
        report, close = _reporter(progress)
        count, work_done, work_total = len(bench.items) - len(todo), sum(work.values()) - sum(work[i.id] for i in todo), sum(work.values())
        report(count, len(bench.items), work_done, work_total)

        def save(finished: dict[int, list[float]], seconds: float) -> None:
            nonlocal count, work_done
            rows = [item_row(todo[r], *rendered[todo[r].id], lps, seconds / len(finished)) for r, lps in finished.items()]
            append_jsonl(out / layout.ITEMS, rows)
            done.update((row["id"], row) for row in rows)
            count, work_done = count + len(rows), work_done + sum(work[row["id"]] for row in rows)
            report(count, len(bench.items), work_done, work_total)

        training = model.training
        model.eval()  # no dropout (a model straight from training); restored below
        try:
            for group in _prefix_groups(todo, shots):
                choice_logprobs(model, [requests[i] for i in group], batch_size=config.batch_size,
                                batch_tokens=config.batch_tokens, on_batch=_renumbered(save, group))  # fmt: skip
        finally:
            model.train(training)
            close()
        return _finish(out, bench, done, settings)


def _renumbered(save: Callable[[dict[int, list[float]], float], None], group: list[int]):
    """`save` for a call on `group`'s items: its request indices mapped back to the whole list's."""
    return lambda got, seconds: save({group[r]: lps for r, lps in got.items()}, seconds)


def _prefix_groups(items: list[BenchItem], shots: int) -> list[list[int]]:
    """Indices of items scored together: all at once, or per subject with K-shot examples (a subject's
    items share their examples, which `choice_logprobs` then computes once)."""
    if not shots:
        return [list(range(len(items)))] if items else []
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.subject, []).append(i)
    return list(groups.values())


def check_context(name: str, items: list[BenchItem], requests: list[Request], context: int | None) -> None:
    """DataError naming the first item whose prompt and longest choice do not fit the model's context
    (checked before any is scored: past it a model scores garbage or the allocator gives up)."""
    if not context:
        return
    for item, req in zip(items, requests, strict=True):
        n = len(req.prompt) + max(len(c) for c in req.choices)
        if n > context:
            raise DataError(f"{name}: item {item.id}: its prompt and longest choice take {n:,} tokens, more than the "
                            f"model's context of {context:,}; shorten the item or leave it out (or fewer --shots)")  # fmt: skip


def answer_key(bench: Bench) -> str:
    """A digest of every item's id, gold and subject: summary.json records it, so a reader can tell
    that the set's answers changed since (an experiment then evaluates again)."""
    key = json.dumps([[item.id, item.gold, item.subject] for item in bench.items], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _regraded(row: dict, item: BenchItem, rendered: tuple[str, list[str]], path: Path) -> dict:
    """`row` graded against `item`'s answer now (the set's answers may have changed since it was
    scored: its log-probabilities still hold, its pred/correct/gold_prob are made again from them)."""
    logprobs = row.get("logprobs")
    if not isinstance(logprobs, list) or len(logprobs) != len(item.choices):
        raise DataError(f"{path}: item {item.id}: logprobs is not a list of {len(item.choices)} numbers; pass "
                        "--overwrite to score again")  # fmt: skip
    if (row.get("gold"), row.get("subject")) == (item.gold, item.subject):
        return row
    seconds = row.get("seconds") if isinstance(row.get("seconds"), (int, float)) else 0.0
    try:
        return item_row(item, *rendered, logprobs, seconds)
    except NonFiniteError as exc:
        raise DataError(f"{path}: {exc}; pass --overwrite to score again") from None


def _resume(out: Path, settings: dict, rendered: dict[str, tuple[str, list[str]]], items: dict[str, BenchItem],
            overwrite: bool) -> dict[str, dict]:  # fmt: skip
    """The rows already scored with these settings, by id, graded against the set's answers now;
    refuses a folder made with others."""
    config = out / layout.EVAL_CONFIG
    if overwrite:
        for name in (layout.ITEMS, layout.EVAL_SUMMARY, layout.EVAL_CONFIG):
            (out / name).unlink(missing_ok=True)
    if config.exists():
        old = read_json_object(config)
        for key, value in settings.items():
            if old.get(key) != value:
                raise EvalSettingsError(f"{out}: holds an evaluation made with {key} {old.get(key)!r}, not {value!r}: "
                                        "pass another --out, or --overwrite to replace it")  # fmt: skip
    write_json(config, settings)
    rows = read_jsonl(out / layout.ITEMS) if (out / layout.ITEMS).exists() else []
    found = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise DataError(f"{out / layout.ITEMS}: row {number}: not an item row with an id; pass --overwrite to score again")
        if row["id"] in rendered:
            if (row.get("prompt"), row.get("choices")) != tuple(rendered[row["id"]]):
                raise EvalSettingsError(f"{out / layout.ITEMS}: item {row['id']}: scored with another prompt than this "
                                        "model's template renders now: pass --overwrite to score again")  # fmt: skip
            row = _regraded(row, items[row["id"]], rendered[row["id"]], out / layout.ITEMS)
        found[row["id"]] = row
    return found


def _finish(out: Path, bench: Bench, done: dict[str, dict], settings: dict) -> dict:
    """items.jsonl rewritten in the set's order (rows of items outside this selection kept at the end),
    and summary.json over the selected items."""
    order = {item.id: i for i, item in enumerate(bench.items)}
    rows = sorted(done.values(), key=lambda row: order.get(row["id"], len(order)))
    write_jsonl(out / layout.ITEMS, rows)
    summary = summarize_rows([row for row in rows if row["id"] in order], settings) | {"answer_key": answer_key(bench)}
    write_json(out / layout.EVAL_SUMMARY, summary)
    return summary


def _reporter(progress: bool | Progress | None) -> tuple[Progress, Callable[[], None]]:
    """(report, close): a terminal bar (progress=True), the caller's `Progress`, or nothing."""
    if progress is True:
        bar = TerminalBar("eval", "items")
        return bar, bar.close
    if callable(progress):
        return progress, lambda: None
    return (lambda *_: None), lambda: None
