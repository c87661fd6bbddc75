"""Summed log-probabilities of several continuations of one prompt, the prompt computed once.

The usual harness pattern scores a k-choice question as k sequences `prompt + choice`, so the
prompt, usually most of the tokens, goes through the model k times. Here an item is one packed
sequence `prompt, choice 1, choice 2, ..., choice k` with a tree attention mask: the prompt's
tokens are causal; a choice's token attends to the prompt and to the earlier tokens of its own
choice, never to another choice. Each choice's positions continue from the end of the prompt
(`L, L+1, ...`), so every choice sees exactly what it would see alone, and its log-probabilities
are those of the separate sequence (to float rounding). Items of similar length are batched, right
padded; a pad attends only to what precedes it and its output is never read. A start common to
every prompt (the chat template's system prompt, K-shot examples) is computed once, and its
key/value cache is shared by every row (`threeds.model.decode.shared_prefix`).

Only the hidden states that predict a choice token go through the output layer (the vocabulary
projection is a fifth of SmolLM2-135M's multiply-adds per token, a quarter of Qwen2.5-0.5B's), in
chunks, and only the log-probability of each choice's own next token is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from threeds.model.decode import Prefix, shared_prefix

PAD_SLACK = 1.25  # past FILL_TOKENS, a batch computes at most this many tokens per token of its rows
FILL_TOKENS = 2048
HEAD_CHUNK = 1024  # positions per output-layer call: [1024, vocab] float32 logits at a time (600 MiB at 150k)
MIN_PREFIX = 16  # tokens; a shorter common start is recomputed per row (it costs less than the cache copy)


@dataclass(frozen=True)
class Request:
    """One item: the prompt's token ids and each choice's continuation token ids (at least one each)."""

    prompt: list[int]
    choices: list[list[int]]


@dataclass
class _Packed:
    """One row of a batch: its token ids, positions, tree groups (-1 prompt, j choice j), and for
    every choice it carries: (request index, choice index, columns predicting its tokens, targets)."""

    ids: list[int]
    positions: list[int]
    groups: list[int]
    reads: list[tuple[int, int, list[int], list[int]]]


OnBatch = Callable[[dict[int, list[float]], float], None]


def pack(requests: Sequence[Request], share: bool = True, start: int = 0) -> list[_Packed]:
    """One row per request (the prompt shared by its choices), or with `share=False` one row per
    (request, choice): `prompt + choice`, the usual harness pattern, kept for comparison. The
    first `start` prompt tokens (a prefix every request shares, in the cache) are left out."""
    rows = []
    for r, req in enumerate(requests):
        groups = [[j for j in range(len(req.choices))]] if share else [[j] for j in range(len(req.choices))]
        for chosen in groups:
            rows.append(_pack_one(r, req, chosen, start))
    return rows


def _pack_one(r: int, req: Request, chosen: list[int], start: int) -> _Packed:
    length = len(req.prompt)
    if length <= start:
        raise ValueError(f"request {r}: the prompt must have a token after the shared prefix")
    ids, positions, groups = list(req.prompt[start:]), list(range(start, length)), [-1] * (length - start)
    reads = []
    for j in chosen:
        cont = req.choices[j]
        if not cont:
            raise ValueError(f"request {r}: choice {j} has no token")
        first = len(ids)
        reads.append((r, j, [length - 1 - start, *range(first, first + len(cont) - 1)], list(cont)))
        ids += cont
        positions += range(length, length + len(cont))
        groups += [j] * len(cont)
    return _Packed(ids, positions, groups, reads)


def batches(rows: Sequence[_Packed], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Row indices per forward, longest first: a batch grows while it has at most `batch_size` rows
    and rows x its longest row stays within `batch_tokens` (a single row may exceed it); past
    `FILL_TOKENS` computed tokens, only while they stay within `PAD_SLACK` times its rows' own
    (padding is computed like any token, but on a CPU a forward of a few hundred tokens costs
    several times more per token than one of a thousand)."""
    out: list[list[int]] = []
    own = 0
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i].ids)):
        n = len(rows[i].ids)
        if out:
            grown = (len(out[-1]) + 1) * len(rows[out[-1][0]].ids)
            fits = len(out[-1]) < batch_size and grown <= batch_tokens
            if fits and (grown <= FILL_TOKENS or grown <= PAD_SLACK * (own + n)):
                out[-1].append(i)
                own += n
                continue
        out.append([i])
        own = n
    return out


def choice_logprobs(
    model, requests: Sequence[Request], *, share: bool = True, batch_size: int = 32, batch_tokens: int = 8192,
    min_prefix: int | None = MIN_PREFIX, on_batch: OnBatch | None = None,
) -> list[list[float]]:  # fmt: skip
    """Summed log-probability of each choice of each request, in choice order.

    A start every prompt shares (a chat template's system prompt, K-shot examples) of at least
    `min_prefix` tokens is computed once and its key/value cache reused by every row (None: never).
    `on_batch({request index: its log-probs}, seconds)` is called after each forward with the
    requests it completed (all of their choices now scored), so a caller can save them at once.
    """
    with torch.inference_mode():
        prefix = shared_prefix(model, [r.prompt for r in requests], min_prefix) if min_prefix is not None else None
    rows = pack(requests, share, prefix.length if prefix is not None else 0)
    sums: list[list[float | None]] = [[None] * len(req.choices) for req in requests]
    left = [len(req.choices) for req in requests]
    for batch in batches(rows, batch_size, batch_tokens):
        began = time.perf_counter()
        with torch.inference_mode():
            scored = _forward(model, [rows[i] for i in batch], prefix)
        finished = []
        for r, j, value in scored:
            sums[r][j] = value
            left[r] -= 1
            if left[r] == 0:
                finished.append(r)
        if on_batch:
            on_batch({r: sums[r] for r in finished}, time.perf_counter() - began)
    return sums  # type: ignore[return-value]


def _forward(model, rows: list[_Packed], prefix: Prefix | None = None) -> list[tuple[int, int, float]]:
    """(request, choice, summed log-prob) for every choice carried by `rows`, from one forward on
    top of the shared `prefix`'s cache (every row sees all of it)."""
    device = model.device
    width = max(len(row.ids) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    positions = torch.zeros_like(ids)
    groups = torch.full((len(rows), width), -2, dtype=torch.long, device=device)  # -2: padding
    for b, row in enumerate(rows):
        n = len(row.ids)
        ids[b, :n] = torch.tensor(row.ids, device=device)
        positions[b, :n] = torch.tensor(row.positions, device=device)
        groups[b, :n] = torch.tensor(row.groups, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    same = (groups[:, None, :] == -1) | (groups[:, None, :] == groups[:, :, None])  # [rows, query, key]
    mask = causal & same
    cache = None
    if prefix is not None:
        cache = DynamicCache(config=model.config)
        for index, (keys, values) in enumerate(prefix.kv):
            cache.update(keys.expand(len(rows), -1, -1, -1), values.expand(len(rows), -1, -1, -1), index)
        mask = torch.cat([mask.new_ones(len(rows), width, prefix.length), mask], 2)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask[:, None], position_ids=positions,
                                 past_key_values=cache, use_cache=cache is not None).last_hidden_state  # fmt: skip
    where = [(b, r, j, cols, targets) for b, row in enumerate(rows) for r, j, cols, targets in row.reads]
    rows_idx = torch.tensor([b for b, _, _, cols, _ in where for _ in cols], device=device)
    cols_idx = torch.tensor([c for _, _, _, cols, _ in where for c in cols], device=device)
    targets = torch.tensor([t for *_, tgt in where for t in tgt], device=device)
    picked = hidden[rows_idx, cols_idx]
    token_lp = torch.cat([_head(model, part).float().log_softmax(-1).gather(1, tgt[:, None])[:, 0]
                          for part, tgt in zip(picked.split(HEAD_CHUNK), targets.split(HEAD_CHUNK))])  # fmt: skip
    sums = torch.split(token_lp, [len(cols) for *_, cols, _ in where])
    return [(r, j, float(s.sum())) for (_, r, j, _, _), s in zip(where, sums)]


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer on selected hidden states, with the final logit soft-cap of models that have one."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
