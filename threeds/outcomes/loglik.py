"""Summed log-probabilities of several continuations of one prompt, the prompt computed once.

The usual harness pattern scores a k-choice question as k sequences `prompt + choice`, so the
prompt, usually most of the tokens, goes through the model k times. Here an item is one packed
sequence `prompt, choice 1, choice 2, ..., choice k` with a tree attention mask: the prompt's
tokens are causal; a choice's token attends to the prompt and to the earlier tokens of its own
choice, never to another choice. Each choice's positions continue from the end of the prompt
(`L, L+1, ...`), so every choice sees exactly what it would see alone, and its log-probabilities
are those of the separate sequence (to float rounding). Items of similar length are batched, right
padded; a pad attends only to what precedes it and its output is never read.

Only the hidden states that predict a choice token go through the output layer (the vocabulary
projection is as costly as the rest of a 135M model per token), and only their log-softmax is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


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


def pack(requests: Sequence[Request], share: bool = True) -> list[_Packed]:
    """One row per request (the prompt shared by its choices), or with `share=False` one row per
    (request, choice): `prompt + choice`, the usual harness pattern, kept for comparison."""
    rows = []
    for r, req in enumerate(requests):
        groups = [[j for j in range(len(req.choices))]] if share else [[j] for j in range(len(req.choices))]
        for chosen in groups:
            rows.append(_pack_one(r, req, chosen))
    return rows


def _pack_one(r: int, req: Request, chosen: list[int]) -> _Packed:
    length = len(req.prompt)
    ids, positions, groups = list(req.prompt), list(range(length)), [-1] * length
    reads = []
    for j in chosen:
        cont = req.choices[j]
        if not cont or not length:
            raise ValueError(f"request {r}: empty prompt or choice {j}")
        start = len(ids)
        reads.append((r, j, [length - 1, *range(start, start + len(cont) - 1)], list(cont)))
        ids += cont
        positions += range(length, length + len(cont))
        groups += [j] * len(cont)
    return _Packed(ids, positions, groups, reads)


def batches(rows: Sequence[_Packed], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Row indices per forward, longest first: a batch grows while it has at most `batch_size` rows
    and rows x its longest row stays within `batch_tokens` (a single row may exceed it)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < batch_size and (len(out[-1]) + 1) * len(rows[out[-1][0]].ids) <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def choice_logprobs(
    model, requests: Sequence[Request], *, share: bool = True, batch_size: int = 32, batch_tokens: int = 8192,
    on_batch: OnBatch | None = None,
) -> list[list[float]]:  # fmt: skip
    """Summed log-probability of each choice of each request, in choice order.

    `on_batch({request index: its log-probs}, seconds)` is called after each forward with the
    requests it completed (all of their choices now scored), so a caller can save them at once.
    """
    rows = pack(requests, share)
    sums: list[list[float | None]] = [[None] * len(req.choices) for req in requests]
    left = [len(req.choices) for req in requests]
    for batch in batches(rows, batch_size, batch_tokens):
        began = time.perf_counter()
        with torch.inference_mode():
            scored = _forward(model, [rows[i] for i in batch])
        finished = []
        for r, j, value in scored:
            sums[r][j] = value
            left[r] -= 1
            if left[r] == 0:
                finished.append(r)
        if on_batch:
            on_batch({r: sums[r] for r in finished}, time.perf_counter() - began)
    return sums  # type: ignore[return-value]


def _forward(model, rows: list[_Packed]) -> list[tuple[int, int, float]]:
    """(request, choice, summed log-prob) for every choice carried by `rows`, from one forward."""
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
    mask = (causal & same)[:, None]
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    where = [(b, r, j, cols, targets) for b, row in enumerate(rows) for r, j, cols, targets in row.reads]
    rows_idx = torch.tensor([b for b, _, _, cols, _ in where for _ in cols], device=device)
    cols_idx = torch.tensor([c for _, _, _, cols, _ in where for c in cols], device=device)
    targets = torch.tensor([t for *_, tgt in where for t in tgt], device=device)
    logits = _head(model, hidden[rows_idx, cols_idx]).float()
    token_lp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    sums = torch.split(token_lp, [len(cols) for *_, cols, _ in where])
    return [(r, j, float(s.sum())) for (_, r, j, _, _), s in zip(where, sums)]


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer on selected hidden states, with the final logit soft-cap of models that have one."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
