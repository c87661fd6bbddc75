"""Stage 2 of 3DS: decomposed difficulty scores for each (instruction, A, A') sample.

Two forward passes per sample (spec, "Equivalences"): `P + A + E` gives Instruction Understanding
(`ins_ppl`), the instruction embedding and Response Correctness (A's weighted loss); `P + A' + E`
gives Response Confidence (A''s weighted loss). Sequences of all samples in a chunk are sorted by
length and packed into batches by a token budget; only the last layer's attention is computed
outside SDPA (`threeds.model.attention`).

The host's share (tokenising, function-word flags, per-token rows) runs beside the model, not
between its passes: `Scorer.score_chunks` is a pipeline in which a background thread prepares the
next chunk (tokens and function-word flags) and another turns each finished batch into rows while
the calling thread keeps the model busy, one batch in flight as before. Batches and results are
exactly those of doing each step in turn.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from itertools import chain, repeat

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from threeds.config import ModelConfig, ScoreConfig
from threeds.io.data import full_instruction
from threeds.model.attention import capture_last_layer, use_threeds_attention
from threeds.model.function_words import FunctionWords
from threeds.model.files import model_label
from threeds.model.load import load_model
from threeds.model.prompts import PromptFormat, prompt_format
from threeds.names import SCORE_COLUMNS, TOKEN_COLUMNS

RESPONSES = {"gt": "output", "gen": "generated_output"}
# Rows of [rows, vocab] float32 logits computed at once (256 MiB).
LOGIT_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Encoded:
    """One templated text `P + R + E` as `ids(P) + ids(R + E)`, truncated on the right."""

    ids: list[int]
    offsets: list[tuple[int, int]]  # character spans in `text`
    prompt_chars: int  # len(P)
    n_prompt: int  # the tokens of P within the kept window; the rest are response tokens
    text: str
    truncated: bool


@dataclass(frozen=True)
class SequenceOut:
    """Per-position results of one forward pass, on the CPU."""

    ce: np.ndarray  # ce[t] = CE(logits[t-1], token[t]); ce[0] = 0
    w_mean: np.ndarray
    w_max: np.ndarray
    embedding: np.ndarray  # mean of last hidden states over the prompt tokens


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, eot: str, max_length: int) -> Encoded:
    """`ids(P) + ids(R + E)` without added special tokens (the template is the authority).

    P is tokenised on its own (spec item 3), so its tokens, `ins_ppl` and the embedding never depend
    on the answer: one call over `P + R + E` would merge P's final newline with an answer's leading
    whitespace into one token."""
    return encode_texts(tokenizer, [prompt], [response + eot], max_length)[0]


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], tails: Sequence[str], max_length: int
) -> list[Encoded]:
    """`encode` of many pairs (P, R + E) in one tokenizer call (each distinct P once): a fast
    tokenizer encodes a list in parallel and outside the GIL. Same result as one call per pair."""
    if not prompts:
        return []
    unique = list(dict.fromkeys(prompts))
    enc = tokenizer([*unique, *tails], add_special_tokens=False, return_offsets_mapping=True)
    pairs = list(zip(enc["input_ids"], enc["offset_mapping"]))
    head = dict(zip(unique, pairs))
    return [
        _joined(prompt, tail, head[prompt], tokens, max_length)
        for prompt, tail, tokens in zip(prompts, tails, pairs[len(unique) :], strict=True)
    ]


def _joined(prompt: str, tail: str, head: tuple, tokens: tuple, max_length: int) -> Encoded:
    """P's (ids, offsets) `head` then those of `R + E` (spans moved past P), cut at `max_length`."""
    (p_ids, p_offsets), (r_ids, r_offsets) = head, tokens
    shift = len(prompt)
    ids = [*p_ids, *r_ids]
    offsets = [*(tuple(o) for o in p_offsets), *((s + shift, e + shift) for s, e in r_offsets)]
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], offsets[:max_length], shift, min(len(p_ids), max_length), prompt + tail, truncated)


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_padding: float = 0.1) -> list[list[int]]:
    """Indices grouped longest first: batch size x longest length stays within the token budget,
    and no sequence is padded by more than `max_padding` of the longest (padding is wasted compute)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            longest = lengths[batches[-1][0]]
            fits = (len(batches[-1]) + 1) * longest <= batch_tokens
            if fits and lengths[i] >= (1 - max_padding) * longest:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


def _predicted_rows(lengths: Sequence[int], length: int) -> torch.Tensor:
    """Flat indices into [B, length - 1] of the positions followed by a real token.

    Made on the host from the known lengths, so selecting them on the device needs no sync (a boolean
    mask would: its count decides the result's shape).
    """
    return torch.cat([torch.arange(n - 1) + row * (length - 1) for row, n in enumerate(lengths)])


def _token_losses(model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
    """[B, L] next-token cross-entropy in float32 (0 at position 0 and on padding), in bounded chunks of logits."""
    head = model.get_output_embeddings()
    batch, length = ids.shape
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, predict)
    targets = ids[:, 1:].reshape(-1).index_select(0, predict)
    flat = torch.zeros(batch * (length - 1), dtype=torch.float32, device=ids.device)
    rows = max(1, LOGIT_ELEMENTS // head.weight.shape[0])
    for i in range(0, len(predict), rows):
        losses = F.cross_entropy(head(states[i : i + rows]).float(), targets[i : i + rows], reduction="none")
        flat.index_copy_(0, predict[i : i + rows], losses)
    return F.pad(flat.view(batch, length - 1), (1, 0))


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without blocking the host (pinned source) where the device is a GPU."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


@dataclass
class PendingBatch:
    """One batch's results on their way to the host: [ce, w_mean, w_max] ([3, B, L]) then the
    embeddings ([B, hidden]), packed in one float32 buffer so that they take one copy."""

    packed: torch.Tensor
    copied: torch.cuda.Event | None  # recorded after the asynchronous copy; None when already on the host
    lengths: list[int]

    def wait(self) -> None:
        """Block until the results are on the host (a no-op on CPU)."""
        if self.copied is not None:
            self.copied.synchronize()

    def outputs(self) -> list[SequenceOut]:
        """Wait for the copy (a no-op on CPU) and split the buffer per sequence."""
        self.wait()
        batch, length = len(self.lengths), max(self.lengths)
        flat = self.packed.numpy()
        per_token = flat[: 3 * batch * length].reshape(3, batch, length)
        emb = flat[3 * batch * length :].reshape(batch, -1)
        return [SequenceOut(*per_token[:, row, :n], emb[row]) for row, n in enumerate(self.lengths)]


@torch.inference_mode()
def launch_batch(model: PreTrainedModel, batch: Sequence[Encoded], pad_id: int) -> PendingBatch:
    """Queue one padded (right) forward pass; everything is reduced on the device and copied back in
    one asynchronous copy, so that on a GPU the host prepares the next batch while this one runs."""
    device = model.device
    lengths = [len(e.ids) for e in batch]
    length = max(lengths)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    for row, enc in enumerate(batch):
        ids[row, : len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.long)
    positions = torch.arange(length)[None, :]
    mask = positions < torch.tensor(lengths)[:, None]
    in_prompt = mask & (positions < torch.tensor([e.n_prompt for e in batch])[:, None])
    ids, mask, in_prompt, predict = (
        _to_device(t, device) for t in (ids, mask, in_prompt, _predicted_rows(lengths, length))
    )
    with capture_last_layer(model, mask) as capture:
        hidden = model.base_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    ce = _token_losses(model, hidden, ids, predict)
    weights = in_prompt.float()
    emb = (hidden.float() * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
    packed = torch.cat([torch.stack([ce, capture.w_mean, capture.w_max]).flatten(), emb.flatten()])
    if packed.device.type != "cuda":
        return PendingBatch(packed, None, lengths)
    host = packed.to("cpu", non_blocking=True)  # into pinned memory
    copied = torch.cuda.Event()
    copied.record()
    return PendingBatch(host, copied, lengths)


def weighted_loss(losses: np.ndarray, weights: np.ndarray, keep: np.ndarray) -> float:
    """sum(loss * w) / sum(w) over kept tokens (weights renormalised); NaN when none is kept."""
    w = weights[keep].astype(np.float64)
    if w.size == 0 or w.sum() <= 0:
        return math.nan
    return float((losses[keep].astype(np.float64) * w).sum() / w.sum())


def prompt_perplexity(enc: Encoded, out: SequenceOut) -> float:
    """exp(mean next-token CE over the prompt tokens); NaN for a prompt of fewer than two tokens."""
    ce = out.ce[1 : enc.n_prompt]
    return float(np.exp(ce.astype(np.float64).mean())) if ce.size else math.nan


@dataclass
class ChunkResult:
    """Scores of a list of samples: rows of metrics.parquet, embeddings, rows of tokens.parquet."""

    metrics: pd.DataFrame
    embeddings: np.ndarray
    tokens: pd.DataFrame


class Scorer:
    """Scores samples with one model; holds what does not change between chunks."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        fmt: PromptFormat,
        function_words: FunctionWords,
        max_length: int = 1024,
        batch_tokens: int = 16384,
    ) -> None:
        if max_length < 2:
            raise ValueError("max_length must be at least 2 tokens")
        self.model, self.tokenizer, self.fmt, self.fw = model, tokenizer, fmt, function_words
        self.max_length, self.batch_tokens = max_length, max(batch_tokens, max_length)
        self.eot = fmt.end_of_turn
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)

    def encode_record(self, record: dict) -> dict[str, Encoded]:
        prompt = self.fmt.prompt(full_instruction(record))
        return {
            name: encode(self.tokenizer, prompt, record[field], self.eot, self.max_length)
            for name, field in RESPONSES.items()
        }

    def run_sequences(self, encoded: list[Encoded], progress: Callable[[int], None] | None = None) -> list[SequenceOut]:
        """Forward passes over length-sorted batches, one batch in flight while the previous one is read."""
        outs: list[SequenceOut | None] = [None] * len(encoded)

        def collect(batch: list[int], pending: PendingBatch) -> None:
            for i, out in zip(batch, pending.outputs()):
                outs[i] = out
            if progress:
                progress(len(batch))

        in_flight: tuple[list[int], PendingBatch] | None = None
        for batch in plan_batches([len(e.ids) for e in encoded], self.batch_tokens):
            launched = (batch, launch_batch(self.model, [encoded[i] for i in batch], self.pad_id))
            if in_flight:
                collect(*in_flight)
            in_flight = launched
        if in_flight:
            collect(*in_flight)
        return outs  # type: ignore[return-value]

    def encode_records(self, records: Sequence[dict]) -> list[Encoded]:
        """`ids(P) + ids(R + E)` of every record, in the order (gt, gen) of the first record, then the
        second's... A bad record fails as `encode_record` would (same error, same record first)."""
        prompts, tails = [], []
        for record in records:
            prompt = self.fmt.prompt(full_instruction(record))
            for field_name in RESPONSES.values():
                prompts.append(prompt)
                tails.append(record[field_name] + self.eot)
        return encode_texts(self.tokenizer, prompts, tails, self.max_length)

    def responses(self, encoded: Sequence[Encoded]) -> list[Response]:
        """Each sequence's response `R + E`, its tokens' spans in it and their function-word flags
        (one `FunctionWords.flags` call over all of them, as the flags do not depend on the model)."""
        texts = [enc.text[enc.prompt_chars :] for enc in encoded]
        spans = [[(s - enc.prompt_chars, e - enc.prompt_chars) for s, e in enc.offsets[enc.n_prompt :]] for enc in encoded]
        flags = self.fw.flags([text[: len(text) - len(self.eot)] for text in texts], spans)
        return [Response(t, s, np.asarray(f, dtype=bool)) for t, s, f in zip(texts, spans, flags)]

    def score(self, records: list[dict], progress: Callable[[int], None] | None = None) -> ChunkResult:
        """All Stage-2 numbers for `records` (each needs `output` and `generated_output`)."""
        with closing(self.score_chunks([records], progress)) as results:
            return next(results)

    def score_chunks(
        self, chunks: Iterable[list[dict]], progress: Callable[[int], None] | None = None
    ) -> Iterator[ChunkResult]:
        """`score` of each chunk in turn, with the host's work beside the model's (module docstring).

        This thread only queues forward passes, one batch in flight while the previous one is read; a
        "prep" thread tokenises the next chunk and flags its function words, a "post" thread turns
        finished batches into rows. A chunk comes out once the next chunk's first batch is queued.
        Numbers are those of the serial order; an error in either thread is raised here, after the
        chunks finished before it. `progress(n)`: n sequences through the model.
        """
        prep = ThreadPoolExecutor(1, thread_name_prefix="threeds-prep")
        post = ThreadPoolExecutor(1, thread_name_prefix="threeds-post")
        in_flight: tuple[_Chunk, list[int], PendingBatch] | None = None
        waiting: deque[_Chunk] = deque()  # planned and not yet handed out, in order

        def start(records: list[dict]) -> _Chunk:
            records = list(records)
            encoded = prep.submit(self.encode_records, records)
            # Runs after `encoded` on the same single thread, so its result is there.
            responses = prep.submit(lambda: self.responses(encoded.result()))
            return _Chunk(records, encoded, responses)

        def retire() -> None:
            """The batch in flight is done: report it and hand its outputs to the post thread."""
            nonlocal in_flight
            if in_flight is not None:
                chunk, batch, pending = in_flight
                in_flight = None
                pending.wait()
                if progress:
                    progress(len(batch))
                chunk.finished.append(post.submit(self._finish_batch, chunk, batch, pending))

        def completed() -> Iterator[ChunkResult]:
            while waiting and waiting[0].complete:
                result = self._assemble(waiting[0])  # a chunk that fails stays first: none is skipped
                waiting.popleft()
                yield result

        try:
            upcoming = iter(chunks)
            first = next(upcoming, _END)
            chunk = start(first) if first is not _END else None
            while chunk is not None:
                encoded = chunk.encoded.result()
                following = next(upcoming, _END)
                following = start(following) if following is not _END else None  # prepared during this one
                chunk.batches = plan_batches([len(e.ids) for e in encoded], self.batch_tokens)
                waiting.append(chunk)
                for batch in chunk.batches:
                    launched = launch_batch(self.model, [encoded[i] for i in batch], self.pad_id)
                    retire()
                    in_flight = (chunk, batch, launched)
                    yield from completed()
                chunk = following
            retire()
            yield from completed()
        except Exception:
            # Hand out what was finished before the failure (best effort), then raise the failure.
            try:
                retire()
                finished = list(completed())
            except Exception:
                finished = []
            yield from finished
            raise
        finally:
            for pool in (prep, post):
                pool.shutdown(wait=True, cancel_futures=True)

    def _finish_batch(self, chunk: _Chunk, batch: list[int], pending: PendingBatch) -> list[tuple[int, _Scored]]:
        """(post thread) One finished batch: each sequence's metrics and token columns."""
        encoded, responses = chunk.encoded.result(), chunk.responses.result()
        names = list(RESPONSES)
        return [
            (i, self._score_sequence(names[i % len(names)], encoded[i], out, responses[i]))
            for i, out in zip(batch, pending.outputs())
        ]

    @staticmethod
    def _score_sequence(name: str, enc: Encoded, out: SequenceOut, response: Response) -> _Scored:
        resp = slice(enc.n_prompt, len(enc.ids))
        losses, w_mean, w_max = out.ce[resp], out.w_mean[resp], out.w_max[resp]
        flags = response.function_word
        keep = ~flags
        row = {
            f"{name}_wloss_mean": weighted_loss(losses, w_mean, keep),
            f"{name}_wloss_max": weighted_loss(losses, w_max, keep),
            f"{name}_tokens": int(losses.size),
            f"{name}_kept_tokens": int(keep.sum()),
            f"{name}_truncated": enc.truncated,
        }
        if name == "gt":
            row["ins_ppl"] = prompt_perplexity(enc, out)
            row["prompt_tokens"] = enc.n_prompt
        spans = np.asarray(response.spans, dtype=np.int64).reshape(-1, 2)
        tokens = {
            "pos": np.arange(len(spans), dtype=np.int64),
            "token": [response.text[s:e] for s, e in response.spans],
            "start": spans[:, 0], "end": spans[:, 1],
            "loss": losses, "w_mean": w_mean, "w_max": w_max, "function_word": flags,
        }  # fmt: skip
        return _Scored(row, tokens, out.embedding if name == "gt" else None)

    def _assemble(self, chunk: _Chunk) -> ChunkResult:
        """The chunk's frames from its sequences' parts, in record order (gt, then gen)."""
        names = list(RESPONSES)
        parts: list[_Scored] = [None] * len(names) * len(chunk.records)  # type: ignore[list-item]
        for finished in chunk.finished:
            for i, part in finished.result():
                parts[i] = part
        metric_rows, embeddings = [], []
        for i, record in enumerate(chunk.records):
            row = {"id": record["id"]}
            for part in parts[len(names) * i : len(names) * (i + 1)]:
                row.update(part.row)
                if part.embedding is not None:
                    embeddings.append(part.embedding)
            row["truncated"] = row["gt_truncated"] or row["gen_truncated"]
            metric_rows.append(row)
        hidden = self.model.config.get_text_config().hidden_size
        return ChunkResult(
            metrics=pd.DataFrame(metric_rows, columns=SCORE_COLUMNS),
            embeddings=np.asarray(embeddings, dtype=np.float32).reshape(len(chunk.records), hidden),
            tokens=_token_frame([r["id"] for r in chunk.records], names, parts),
        )


_END = object()


@dataclass(frozen=True)
class Response:
    """One sequence's response text `R + E`, its tokens' character spans in it, their function-word flags."""

    text: str
    spans: list[tuple[int, int]]
    function_word: np.ndarray  # bool, one per response token


@dataclass
class _Scored:
    """One response's share of a chunk's results."""

    row: dict  # its columns of metrics.parquet
    tokens: dict  # its columns of tokens.parquet but `id` and `response`
    embedding: np.ndarray | None  # the sample's embedding (from the gt sequence)


@dataclass
class _Chunk:
    """A chunk of records on its way through `Scorer.score_chunks`."""

    records: list[dict]
    encoded: Future  # -> list[Encoded], (gt, gen) per record
    responses: Future  # -> list[Response], same order
    batches: list[list[int]] | None = None  # set once planned
    finished: list[Future] = field(default_factory=list)  # one per batch through the model

    @property
    def complete(self) -> bool:
        return self.batches is not None and len(self.finished) == len(self.batches)


def _token_frame(ids: list, names: list[str], parts: list[_Scored]) -> pd.DataFrame:
    """What an attention/loss heatmap of each response needs, one row per response token (columns
    built whole: the float columns are the float32 results widened to float64, as before)."""
    sizes = [len(part.tokens["pos"]) for part in parts]
    if not sum(sizes):
        return pd.DataFrame([], columns=TOKEN_COLUMNS)
    labels = [(sample_id, name) for sample_id in ids for name in names]
    columns = {
        "id": list(chain.from_iterable(repeat(sample_id, n) for (sample_id, _), n in zip(labels, sizes))),
        "response": list(chain.from_iterable(repeat(name, n) for (_, name), n in zip(labels, sizes))),
        "token": list(chain.from_iterable(part.tokens["token"] for part in parts)),
    }
    for name in ("pos", "start", "end", "function_word"):
        columns[name] = np.concatenate([part.tokens[name] for part in parts])
    for name in ("loss", "w_mean", "w_max"):
        columns[name] = np.concatenate([part.tokens[name] for part in parts]).astype(np.float64)
    return pd.DataFrame(columns, columns=TOKEN_COLUMNS)


def build_scorer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, score: ScoreConfig, spec: ModelConfig) -> Scorer:
    """A Scorer from the run's settings (with the capturing attention switched on)."""
    use_threeds_attention(model)
    fmt = prompt_format(tokenizer, spec.template, spec.system)
    return Scorer(model, tokenizer, fmt, FunctionWords(score.function_words), max_length=score.max_length,
                  batch_tokens=score.batch_tokens)  # fmt: skip


@dataclass
class ScoredChunk:
    """One chunk's results from an engine; `info` (manifest fields naming the model) where the engine
    learns them only with the results, as the Ray engine does."""

    index: int
    result: ChunkResult
    info: dict | None = None


class LocalEngine:
    """Scores chunks in this process with one model (the default engine; `threeds.stages.engine_ray` is the other)."""

    def __init__(self, score: ScoreConfig, spec: ModelConfig, loaded: tuple | None = None) -> None:
        """`loaded`: a (model, tokenizer) the caller already has, else `spec` is loaded on `start`."""
        self.score, self.spec, self.loaded = score, spec, loaded
        self.scorer: Scorer | None = None

    def start(self) -> dict:
        """Load the model; returns the manifest fields that describe it."""
        model, tokenizer = self.loaded or load_model(self.spec.model, dtype=self.spec.load_dtype)
        self.scorer = build_scorer(model, tokenizer, self.score, self.spec)
        return {"model": model_info(model, self.spec.model), "function_words": self.scorer.fw.describe()}

    def results(
        self, chunks: Sequence[list[dict]], pending: Sequence[int], progress: Callable[[int], None]
    ) -> Iterator[ScoredChunk]:
        """One pipeline over all pending chunks: the next chunk is prepared while this one runs."""
        with closing(self.scorer.score_chunks((chunks[i] for i in pending), progress=progress)) as results:
            for index, result in zip(pending, results, strict=True):
                yield ScoredChunk(index, result)

    def close(self) -> None:
        self.scorer = None


def model_info(model: PreTrainedModel, spec: str | None) -> dict:
    return {
        "spec": model_label(spec) if model is not None and spec is None else spec,
        "name_or_path": model.name_or_path,
        "architecture": type(model).__name__,
        "dtype": str(model.dtype),
        "device": str(model.device),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
