"""Greedy decoding with continuous refill: a batch that stays full until the prompts run out.

On a CPU a small model is bound by the cost of one decoding step (reading every weight once), not
by its arithmetic, so a step for 32 rows costs little more than a step for 8. Plain batched
`model.generate` also makes every row wait for the longest answer of its batch. Here a row that
finishes (stop token or `max_new_tokens`) is reported at once and its place goes to the next
prompt, so every step works for as many unfinished answers as the token budget allows.

Greedy answers are those of `model.generate` one prompt at a time: each prompt is prefilled alone
(no padding), and in the shared decoding steps a row attends only to its own tokens (the columns
left of them are masked, positions count its own tokens). Each row lives in a slot of one key/value
cache with spare columns: a step writes one column in place, and a new prompt is written into the
slot a finished row left, so neither copies the cache. Device-agnostic: everything lives on
`model.device`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

OnDone = Callable[[int, list[int], float], None]


class SlotLayer(DynamicLayer):
    """One layer's keys/values in buffers [slots, heads, capacity, dim]: `keys`/`values` are views of
    the columns written so far, and a decoding step writes one more column in place."""

    def allocate(self, like: torch.Tensor, slots: int, capacity: int, width: int = 0) -> None:
        """Zeroed buffers (masked columns must stay finite) of which the first `width` columns count."""
        _, heads, _, dim = like.shape
        self.kbuf = like.new_zeros(slots, heads, capacity, dim)
        self.vbuf = like.new_zeros(slots, heads, capacity, dim)
        self.width = width
        self.dtype, self.device, self.is_initialized = like.dtype, like.device, True
        self._view()

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, spare: int) -> SlotLayer:
        """A layer holding [slots, heads, n, dim] keys/values, with `spare` free columns."""
        layer = cls()
        layer.allocate(keys, keys.shape[0], keys.shape[2] + spare, keys.shape[2])
        layer.kbuf[:, :, : keys.shape[2]] = keys
        layer.vbuf[:, :, : keys.shape[2]] = values
        return layer

    def _view(self) -> None:
        self.keys, self.values = self.kbuf[:, :, : self.width], self.vbuf[:, :, : self.width]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        self.kbuf[:, :, self.width : self.width + n] = key_states
        self.vbuf[:, :, self.width : self.width + n] = value_states
        self.width += n
        self._view()
        return self.keys, self.values

    def place(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one prompt's [1, heads, n, dim] cache into `slot`, ending at the current column."""
        n = keys.shape[-2]
        self.kbuf[slot, :, self.width - n : self.width] = keys[0]
        self.vbuf[slot, :, self.width - n : self.width] = values[0]

    def moved(self, slots: torch.Tensor, first: int, n_slots: int, capacity: int) -> SlotLayer:
        """A copy keeping `slots` (in that order) and columns from `first` (negative: pad on the left)."""
        layer = SlotLayer()
        width = self.width - first
        layer.allocate(self.kbuf, n_slots, capacity, width)
        src = slice(max(first, 0), self.width)
        layer.kbuf[: len(slots), :, width - (src.stop - src.start) : width] = self.kbuf[slots, :, src]
        layer.vbuf[: len(slots), :, width - (src.stop - src.start) : width] = self.vbuf[slots, :, src]
        return layer


@dataclass
class _Row:
    index: int
    length: int  # real tokens in the cache (prompt + answer so far); the row's next position
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0


MIN_SHARED_PREFIX = 64  # tokens; a shorter common start (a chat template's system prompt) is not shared


@dataclass
class Prefix:
    """The key/value cache of the tokens every prompt starts with (a rating prompt's instructions
    and examples), computed once instead of once per prompt."""

    length: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]


def shared_prefix(model, inputs: Sequence[Sequence[int]], minimum: int = MIN_SHARED_PREFIX) -> Prefix | None:
    """The prefilled common start of all `inputs` (each keeps at least one token of its own), or
    None when it is shorter than `minimum` tokens."""
    if not inputs:
        return None
    first = inputs[0]
    length = min(len(ids) for ids in inputs) - 1
    for ids in inputs[1:]:
        length = next((j for j in range(length) if ids[j] != first[j]), length)
    if length < minimum:
        return None
    return Prefix(length, prefill(model, first[:length])[1])


def prefill(
    model, ids: Sequence[int], prefix: Prefix | None = None
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(logits of the next token, per-layer (keys, values)) for one prompt, alone, as generate does;
    with `prefix`, only the tokens after it are computed."""
    cache = DynamicCache(config=model.config)
    start = 0
    if prefix is not None:
        for index, (keys, values) in enumerate(prefix.kv):
            cache.update(keys, values, index)
        start = prefix.length
    out = model(input_ids=torch.tensor([list(ids[start:])], device=model.device), past_key_values=cache,
                use_cache=True, logits_to_keep=1)  # fmt: skip
    return out.logits[0, -1], [(layer.keys, layer.values) for layer in cache.layers]


class _Batch:
    """Rows decoded together, each in a slot of one cache, all right-aligned at the current column.

    A finished row only frees its slot (its columns are masked out); the next prompt is written into
    that slot where the others stand, so refilling copies nothing else. The cache is moved, which
    copies it, only to add slots, to make room on the right (dropping columns no row needs), or,
    once no prompt waits, to drop free slots when a quarter of them are free.
    """

    def __init__(self, model, spare: int) -> None:
        self.model, self.spare = model, spare
        self.slots: list[_Row | None] = []
        self.last: list[int] = []  # each slot's latest token, fed at the next step
        self.cache: Cache | None = None
        self.mask: torch.Tensor | None = None  # [slots, capacity]: 1 for a real token of the slot's row
        self.width = 0

    @property
    def rows(self) -> list[_Row]:
        return [r for r in self.slots if r is not None]

    def add(self, new: list[tuple[_Row, list, int]]) -> None:
        """Place prefilled rows (row, per-layer kv, first token) into free slots."""
        free = [s for s, r in enumerate(self.slots) if r is None]
        need = max(r.length for r, _, _ in new)
        if self.cache is None:
            self._move([], len(new), need, new[0][1][0][0])
        elif len(free) < len(new) or need > self.width:
            self._move(self._live(), len(self.rows) + len(new), need)
        free = [s for s, r in enumerate(self.slots) if r is None]
        for slot, (row, kv, token) in zip(free, new):
            for layer, (k, v) in zip(self.cache.layers, kv):
                layer.place(slot, k, v)
            self.mask[slot] = 0
            self.mask[slot, self.width - row.length : self.width] = 1
            self.slots[slot], self.last[slot] = row, token

    def free(self, slot: int) -> None:
        self.slots[slot] = None
        self.mask[slot] = 0

    def shrink(self) -> None:
        """Drop free slots once a quarter of them are free (only when no prompt waits to use them)."""
        if len(self.slots) - len(self.rows) >= max(1, len(self.slots) // 4):
            live = self._live()
            self._move(live, len(live), 0)

    def step(self) -> list[int | None]:
        """One greedy token for every slot (None for a free one)."""
        if self.width >= self.mask.shape[1]:
            self._move(list(range(len(self.slots))), len(self.slots), 0)
        device = self.model.device
        self.mask[:, self.width] = 1
        positions = torch.tensor([[r.length if r else 0] for r in self.slots], device=device)
        out = self.model(input_ids=torch.tensor([[t] for t in self.last], device=device),
                         attention_mask=self.mask[:, : self.width + 1], position_ids=positions,
                         past_key_values=self.cache, use_cache=True)  # fmt: skip
        self.width += 1
        tokens = out.logits[:, -1].argmax(-1).tolist()
        for r in self.rows:
            r.length += 1
        self.last = tokens
        return [t if r else None for t, r in zip(tokens, self.slots)]

    def _live(self) -> list[int]:
        return [s for s, r in enumerate(self.slots) if r is not None]

    def _move(self, keep: list[int], n_slots: int, need: int, like: torch.Tensor | None = None) -> None:
        """Copy slots `keep` into a cache of `n_slots` slots whose columns start at the first one a
        kept row uses, or further left so that a prompt of `need` tokens fits; then `spare` more."""
        longest = max([self.slots[s].length for s in keep if self.slots[s]] + [need])
        first = self.width - longest
        capacity = longest + self.spare
        device = self.model.device
        mask = torch.zeros(n_slots, capacity, dtype=torch.long, device=device)
        if like is not None:
            layers = [SlotLayer() for _ in range(self.model.config.num_hidden_layers)]
            for layer in layers:
                layer.allocate(like, n_slots, capacity, longest)
        else:
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            layers = [layer.moved(idx, first, n_slots, capacity) for layer in self.cache.layers]
            src = self.mask[idx, max(first, 0) : self.width]
            mask[: len(keep), longest - src.shape[1] : longest] = src
        self.cache = Cache(layers=layers)
        self.mask, self.width = mask, longest
        self.slots = [self.slots[s] for s in keep] + [None] * (n_slots - len(keep))
        self.last = [self.last[s] for s in keep] + [0] * (n_slots - len(keep))


def greedy_decode(
    model, inputs: Sequence[Sequence[int]], stop: Sequence[int], max_new_tokens: int, *,
    batch_tokens: int = 16384, max_rows: int = 64, on_done: OnDone | None = None,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuation of every token list, cut before the first stop token.

    Up to `max_rows` rows decode together while rows x (longest prompt among them +
    `max_new_tokens`) stays within `batch_tokens` (always at least one row). Prompts enter longest
    first. A start common to every prompt of at least `MIN_SHARED_PREFIX` tokens is prefilled once
    (`shared_prefix`). `on_done(index, tokens, seconds)` is called as each one finishes; `seconds` is
    its prefill plus its share of every step it took part in (the shared start is not counted).
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
        prefix = shared_prefix(model, inputs)
        while queue or batch.rows:
            new = _admit(model, inputs, prefix, queue, batch, stop_set, max_new_tokens, batch_tokens, max_rows, finish)
            if new:
                batch.add(new)
            if not batch.rows:
                continue
            began = time.perf_counter()
            tokens = batch.step()
            share = (time.perf_counter() - began) / len(batch.rows)
            for slot, (row, token) in enumerate(zip(batch.slots, tokens)):
                if row is None:
                    continue
                row.seconds += share
                if token not in stop_set:
                    row.tokens.append(token)
                if token in stop_set or len(row.tokens) >= max_new_tokens:
                    finish(row)
                    batch.free(slot)
            if not queue and batch.rows:
                batch.shrink()
    return results  # type: ignore[return-value]


def _admit(
    model, inputs, prefix: Prefix | None, queue: list[int], batch: _Batch, stop_set: set[int], max_new_tokens: int, batch_tokens: int,
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
        logits, kv = prefill(model, inputs[index], prefix)
        token = int(logits.argmax())
        row = _Row(index, len(inputs[index]), seconds=time.perf_counter() - began)
        if token in stop_set or max_new_tokens <= 1:
            row.tokens = [] if token in stop_set else [token]
            finish(row)
            continue
        row.tokens.append(token)
        new.append((row, kv, token))
    return new
