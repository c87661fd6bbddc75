"""Greedy decoding with continuous refill: a batch that stays full until the prompts run out.

On a CPU a small model is bound by the cost of one decoding step (reading every weight once), not
by its arithmetic, so a step for 32 rows costs little more than a step for 8. Plain batched
`model.generate` also makes every row wait for the longest answer of its batch. Here a row that
finishes (stop token or `max_new_tokens`) is reported at once and its place goes to the next
prompt, so every step works for as many unfinished answers as the token budget allows.

Greedy answers are those of `model.generate` one prompt at a time: each prompt is prefilled alone
(no padding), and in the shared decoding steps a row attends only to its own tokens (left padding
is masked, positions count its own tokens). The key/value cache keeps spare columns, so a step
writes one column instead of copying the cache. Device-agnostic: everything lives on `model.device`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

OnDone = Callable[[int, list[int], float], None]


class _SpareLayer(DynamicLayer):
    """A cache layer whose keys/values are views of buffers with spare columns on the right."""

    def reset_to(self, keys: torch.Tensor, values: torch.Tensor, spare: int) -> None:
        batch, heads, width, dim = keys.shape
        self.kbuf = keys.new_zeros(batch, heads, width + spare, dim)
        self.vbuf = values.new_zeros(batch, heads, width + spare, dim)
        self.kbuf[:, :, :width] = keys
        self.vbuf[:, :, :width] = values
        self.width = width
        self.keys, self.values = self.kbuf[:, :, :width], self.vbuf[:, :, :width]
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.width + n > self.kbuf.shape[-2]:
            self.reset_to(self.keys, self.values, spare=max(n, 64))
        self.kbuf[:, :, self.width : self.width + n] = key_states
        self.vbuf[:, :, self.width : self.width + n] = value_states
        self.width += n
        self.keys, self.values = self.kbuf[:, :, : self.width], self.vbuf[:, :, : self.width]
        return self.keys, self.values


@dataclass
class _Row:
    index: int
    length: int  # real tokens in the cache (prompt + answer so far); the row's next position
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0


def prefill(model, ids: Sequence[int]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(logits of the next token, per-layer (keys, values)) for one prompt, alone, as generate does."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([list(ids)], device=model.device), past_key_values=cache, use_cache=True,
                logits_to_keep=1)  # fmt: skip
    return out.logits[0, -1], [(layer.keys, layer.values) for layer in cache.layers]


class _Batch:
    """The rows being decoded, right-aligned in one cache; left padding is masked out."""

    def __init__(self, model, spare: int) -> None:
        self.model, self.spare = model, spare
        self.rows: list[_Row] = []
        self.cache: Cache | None = None
        self.mask: torch.Tensor | None = None  # [rows, width]: 1 for a real token
        self.last: list[int] = []  # each row's latest token, fed at the next step

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def rebuild(self, keep: list[int], new: list[tuple[_Row, list, int]]) -> None:
        """Keep rows `keep`, add prefilled rows `new` (row, per-layer kv, first token); drop padding
        columns no row needs."""
        rows = [self.rows[i] for i in keep] + [r for r, _, _ in new]
        self.last = [self.last[i] for i in keep] + [t for _, _, t in new]
        self.rows = rows
        if not rows:
            self.cache, self.mask = None, None
            return
        width = max(r.length for r in rows)
        device = self.model.device
        self.mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for j, r in enumerate(rows):
            self.mask[j, width - r.length :] = 1
        n_layers = len(new[0][1]) if new else len(self.cache.layers)
        cache = Cache(layers=[_SpareLayer() for _ in range(n_layers)])
        for li in range(n_layers):
            parts_k, parts_v = [], []
            if keep:
                idx = torch.tensor(keep, device=device)
                old = self.cache.layers[li]
                parts_k.append(_fit(old.keys.index_select(0, idx), width))
                parts_v.append(_fit(old.values.index_select(0, idx), width))
            for _, kv, _ in new:
                parts_k.append(_fit(kv[li][0], width))
                parts_v.append(_fit(kv[li][1], width))
            cache.layers[li].reset_to(torch.cat(parts_k), torch.cat(parts_v), self.spare)
        self.cache = cache

    def step(self) -> list[int]:
        """One greedy token for every row."""
        device = self.model.device
        ones = torch.ones(len(self.rows), 1, dtype=torch.long, device=device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        positions = torch.tensor([[r.length] for r in self.rows], device=device)
        out = self.model(input_ids=torch.tensor([[t] for t in self.last], device=device), attention_mask=self.mask,
                         position_ids=positions, past_key_values=self.cache, use_cache=True)  # fmt: skip
        tokens = out.logits[:, -1].argmax(-1).tolist()
        for r in self.rows:
            r.length += 1
        self.last = tokens
        return tokens


def _fit(kv: torch.Tensor, width: int) -> torch.Tensor:
    """Right-align [rows, heads, w, dim] into `width` columns (zeros on the left, or the leftmost
    columns dropped when every row's padding covers them)."""
    w = kv.shape[2]
    if w >= width:
        return kv[:, :, w - width :]
    pad = kv.new_zeros(kv.shape[0], kv.shape[1], width - w, kv.shape[3])
    return torch.cat([pad, kv], dim=2)


def greedy_decode(
    model, inputs: Sequence[Sequence[int]], stop: Sequence[int], max_new_tokens: int, *,
    batch_tokens: int = 16384, max_rows: int = 64, on_done: OnDone | None = None,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuation of every token list, cut before the first stop token.

    Up to `max_rows` rows decode together while rows x (longest prompt among them +
    `max_new_tokens`) stays within `batch_tokens` (always at least one row). Prompts enter longest
    first. `on_done(index, tokens, seconds)` is called as each one finishes; `seconds` is its prefill
    plus its share of every step it took part in.
    """
    stop_set = set(stop)
    results: list[list[int] | None] = [None] * len(inputs)
    queue = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    batch = _Batch(model, spare=min(max_new_tokens, 256))

    def finish(row: _Row) -> None:
        results[row.index] = row.tokens
        if on_done:
            on_done(row.index, row.tokens, row.seconds)

    with torch.inference_mode():
        while queue or batch.rows:
            new = _admit(model, inputs, queue, batch, stop_set, max_new_tokens, batch_tokens, max_rows, finish)
            if new:
                batch.rebuild(list(range(len(batch.rows))), new)
            if not batch.rows:
                continue
            began = time.perf_counter()
            tokens = batch.step()
            share = (time.perf_counter() - began) / len(batch.rows)
            keep = []
            for j, (row, token) in enumerate(zip(batch.rows, tokens)):
                row.seconds += share
                if token not in stop_set:
                    row.tokens.append(token)
                if token in stop_set or len(row.tokens) >= max_new_tokens:
                    finish(row)
                else:
                    keep.append(j)
            if len(keep) < len(batch.rows):
                batch.rebuild(keep, [])
    return results  # type: ignore[return-value]


def _admit(
    model, inputs, queue: list[int], batch: _Batch, stop_set: set[int], max_new_tokens: int, batch_tokens: int,
    max_rows: int, finish: Callable[[_Row], None],
) -> list[tuple[_Row, list, int]]:  # fmt: skip
    """Prefill queued prompts into free places of the batch; a prompt whose first token already
    ends it finishes here."""
    new: list[tuple[_Row, list, int]] = []
    longest = max((len(inputs[r.index]) for r in batch.rows), default=0)
    while queue:
        rows = len(batch.rows) + len(new)
        need = max(longest, len(inputs[queue[0]])) + max_new_tokens
        if rows and (rows >= max_rows or (rows + 1) * need > batch_tokens):
            break
        index = queue.pop(0)
        longest = max(longest, len(inputs[index]))
        began = time.perf_counter()
        logits, kv = prefill(model, inputs[index])
        token = int(logits.argmax())
        row = _Row(index, len(inputs[index]), seconds=time.perf_counter() - began)
        if token in stop_set or max_new_tokens <= 1:
            row.tokens = [] if token in stop_set else [token]
            finish(row)
            continue
        row.tokens.append(token)
        new.append((row, kv, token))
    return new
