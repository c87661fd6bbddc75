"""Stage 2 of 3DS: decomposed difficulty scores for each (instruction, A, A') sample.

Two forward passes per sample (spec, "Equivalences"): `P + A + E` gives Instruction Understanding
(`ins_ppl`), the instruction embedding and Response Correctness (A's weighted loss); `P + A' + E`
gives Response Confidence (A''s weighted loss). Sequences of all samples in a chunk are sorted by
length and packed into batches by a token budget; only the last layer's attention is computed
outside SDPA (`threeds.attention`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tqdm.auto import tqdm

from threeds.attention import capture_last_layer, use_threeds_attention
from threeds.data import full_instruction, require_fields, write_jsonl
from threeds.function_words import FunctionWords
from threeds.model import load_model, model_label
from threeds.prompts import PromptFormat, prompt_format
from threeds.rundir import RunDir, RunError, package_versions

log = logging.getLogger(__name__)

RESPONSES = {"gt": "output", "gen": "generated_output"}
# Rows of [rows, vocab] float32 logits computed at once (256 MiB).
LOGIT_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Encoded:
    """One templated text `P + R + E`, tokenised and truncated on the right."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    prompt_chars: int  # len(P): tokens starting at or after it are response tokens
    n_prompt: int  # tokens starting before len(P), within the kept window
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
    """Tokenise `P + R + E` without added special tokens (the template is the authority)."""
    text = prompt + response + eot
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    truncated = len(ids) > max_length
    ids, offsets = ids[:max_length], offsets[:max_length]
    n_prompt = bisect.bisect_left([start for start, _ in offsets], len(prompt))
    return Encoded(ids, offsets, len(prompt), n_prompt, text, truncated)


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

    def outputs(self) -> list[SequenceOut]:
        """Wait for the copy (a no-op on CPU) and split the buffer per sequence."""
        if self.copied is not None:
            self.copied.synchronize()
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

    def score(self, records: list[dict], progress: Callable[[int], None] | None = None) -> ChunkResult:
        """All Stage-2 numbers for `records` (each needs `output` and `generated_output`)."""
        encoded = [self.encode_record(r) for r in records]
        flat = [enc[name] for enc in encoded for name in RESPONSES]
        outs = self.run_sequences(flat, progress)
        responses = [enc.text[enc.prompt_chars :] for enc in flat]
        spans = [[(s - enc.prompt_chars, e - enc.prompt_chars) for s, e in enc.offsets[enc.n_prompt :]] for enc in flat]
        flags = self.fw.flags(
            [text[: len(text) - len(self.eot)] for text in responses], spans
        )
        metric_rows, token_rows, embeddings = [], [], []
        for i, record in enumerate(records):
            row = {"id": record["id"]}
            for j, name in enumerate(RESPONSES):
                k = 2 * i + j
                enc, out, flag = flat[k], outs[k], np.asarray(flags[k], dtype=bool)
                resp = slice(enc.n_prompt, len(enc.ids))
                losses, w_mean, w_max = out.ce[resp], out.w_mean[resp], out.w_max[resp]
                keep = ~flag
                row[f"{name}_wloss_mean"] = weighted_loss(losses, w_mean, keep)
                row[f"{name}_wloss_max"] = weighted_loss(losses, w_max, keep)
                row[f"{name}_tokens"] = int(losses.size)
                row[f"{name}_kept_tokens"] = int(keep.sum())
                row[f"{name}_truncated"] = enc.truncated
                token_rows.extend(_token_rows(record["id"], name, responses[k], spans[k], losses, w_mean, w_max, flag))
                if name == "gt":
                    row["ins_ppl"] = prompt_perplexity(enc, out)
                    row["prompt_tokens"] = enc.n_prompt
                    embeddings.append(out.embedding)
            row["truncated"] = row["gt_truncated"] or row["gen_truncated"]
            metric_rows.append(row)
        hidden = self.model.config.get_text_config().hidden_size
        return ChunkResult(
            metrics=pd.DataFrame(metric_rows, columns=METRIC_COLUMNS),
            embeddings=np.asarray(embeddings, dtype=np.float32).reshape(len(records), hidden),
            tokens=pd.DataFrame(token_rows, columns=TOKEN_COLUMNS),
        )


METRIC_COLUMNS = [
    "id", "ins_ppl", "gt_wloss_mean", "gt_wloss_max", "gen_wloss_mean", "gen_wloss_max",
    "prompt_tokens", "gt_tokens", "gen_tokens", "gt_kept_tokens", "gen_kept_tokens",
    "gt_truncated", "gen_truncated", "truncated",
]  # fmt: skip
TOKEN_COLUMNS = ["id", "response", "pos", "token", "start", "end", "loss", "w_mean", "w_max", "function_word"]


def _token_rows(
    sample_id: str,
    response: str,
    text: str,
    spans: list[tuple[int, int]],
    losses: np.ndarray,
    w_mean: np.ndarray,
    w_max: np.ndarray,
    flags: np.ndarray,
) -> list[tuple]:
    """What an attention/loss heatmap of one response needs, one row per response token."""
    return [
        (sample_id, response, pos, text[s:e], s, e, float(losses[pos]), float(w_mean[pos]), float(w_max[pos]), bool(flags[pos]))
        for pos, (s, e) in enumerate(spans)
    ]


def records_fingerprint(records: list[dict]) -> str:
    """Content hash of the records to score: a changed input never resumes an old run."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def score_run(
    records: list[dict],
    run_dir: str | os.PathLike,
    *,
    model_spec: str | None = None,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int = 1024,
    function_words: str = "auto",
    batch_tokens: int = 16384,
    template: str | None = None,
    system: str | None = None,
    chunk_size: int = 256,
    data_path: str | None = None,
    rejects: Sequence[dict] = (),
    overwrite: bool = False,
    progress: bool = True,
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
) -> dict:
    """Score `records` into `run_dir` (resumable) and return the run's manifest.

    `rejects` (from reading the input) and records without a non-empty `generated_output` are
    written to `rejects.jsonl`; the rest are scored. `engine="ray"` scores the chunks on a Ray cluster
    (`threeds.engine_ray`) into the same chunk files, so either engine resumes the other's run.
    """
    run = RunDir(run_dir)
    kept, missing = require_fields(records, ["generated_output"])
    rejects = [*rejects, *missing]
    config = {
        "model": model_spec or (model.name_or_path if model is not None else None),
        "max_length": max_length, "function_words": function_words, "template": template,
        "system": system, "chunk_size": chunk_size, "data_fingerprint": records_fingerprint(kept),
    }  # fmt: skip
    manifest = run.read_manifest()
    if overwrite or manifest.get("score_config") != config:
        if manifest.get("score_config") and not overwrite and (run.chunks.exists() or run.file("metrics.parquet").exists()):
            raise RunError(
                f"{run.path} holds scores made with another configuration or data; "
                "pass --overwrite to replace them or choose another --out"
            )
        run.clear_scores()
    elif manifest.get("status") == "scored" and run.file("metrics.parquet").exists():
        log.info("%s: already scored with this configuration; nothing to do", run.path)
        return manifest
    run.path.mkdir(parents=True, exist_ok=True)
    if rejects:
        write_jsonl(run.file("rejects.jsonl"), rejects)
        log.warning("%d records rejected (see %s)", len(rejects), run.file("rejects.jsonl"))
    timings = manifest.get("timings", {}) if manifest.get("score_config") == config else {}
    manifest = run.update_manifest(
        status="scoring", score_config=config, config={**manifest.get("config", {}), **config},
        data={"path": data_path, "fingerprint": config["data_fingerprint"], "n_records": len(records) + len(rejects) - len(missing),
              "n_rejected": len(rejects), "n_scored": len(kept)},
        packages=package_versions(), timings=timings,
    )  # fmt: skip
    chunks = [kept[i : i + chunk_size] for i in range(0, len(kept), chunk_size)]
    pending = [i for i in range(len(chunks)) if i not in run.done_chunks()]
    if pending:
        settings = {"max_length": max_length, "function_words": function_words, "batch_tokens": batch_tokens,
                    "template": template, "system": system}  # fmt: skip
        if engine == "ray":
            from threeds.engine_ray import score_chunks_ray

            spent = score_chunks_ray(run, chunks, pending, model_spec, settings, address=ray_address,
                                     workers=ray_workers, progress=progress)  # fmt: skip
        else:
            spent = _score_chunks_local(run, chunks, pending, model_spec, model, tokenizer, settings, progress)
        timings = {name: timings.get(name, 0.0) + seconds for name, seconds in spent.items()}
    metrics = run.consolidate(len(chunks), kept)
    return run.update_manifest(status="scored", timings=timings, report=score_report(metrics))


def build_scorer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    function_words: str,
    batch_tokens: int,
    template: str | None,
    system: str | None,
) -> Scorer:
    """A Scorer from the run's settings (with the capturing attention switched on)."""
    use_threeds_attention(model)
    fmt = prompt_format(tokenizer, template, system)
    return Scorer(model, tokenizer, fmt, FunctionWords(function_words), max_length=max_length, batch_tokens=batch_tokens)


def _score_chunks_local(
    run: RunDir,
    chunks: list[list[dict]],
    pending: list[int],
    model_spec: str | None,
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    settings: dict,
    progress: bool,
) -> dict[str, float]:
    """Score the pending chunks in this process, writing each as it finishes; returns the timings."""
    started = time.perf_counter()
    if model is None or tokenizer is None:
        model, tokenizer = load_model(model_spec)
    scorer = build_scorer(model, tokenizer, **settings)
    load_seconds = time.perf_counter() - started
    run.update_manifest(model=model_info(model, model_spec), function_words=scorer.fw.describe())
    started = time.perf_counter()
    total = 2 * sum(len(chunks[i]) for i in pending)
    with tqdm(total=total, unit="seq", desc="score", disable=not progress) as bar:
        for index in pending:
            result = scorer.score(chunks[index], progress=bar.update)
            run.write_chunk(index, result.metrics, result.embeddings, result.tokens)
            run.write_progress("score", bar.n, total)
    return {"load_seconds": load_seconds, "score_seconds": time.perf_counter() - started}


def score_report(metrics: pd.DataFrame) -> dict:
    """Counts a user wants after scoring: truncations and samples left without a response token."""
    return {
        "n_scored": len(metrics),
        "n_truncated": int(metrics["truncated"].sum()),
        "n_nan": {c: int(metrics[c].isna().sum()) for c in METRIC_COLUMNS if c.endswith(("_ppl", "_mean", "_max"))},
    }


def model_info(model: PreTrainedModel, spec: str | None) -> dict:
    return {
        "spec": model_label(spec) if model is not None and spec is None else spec,
        "name_or_path": model.name_or_path,
        "architecture": type(model).__name__,
        "dtype": str(model.dtype),
        "device": str(model.device),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
