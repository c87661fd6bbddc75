"""`threeds score`: Stage 2 decomposed-difficulty scores of a data set into a run directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from threeds.config import (
    DataConfig,
    EngineConfig,
    ModelConfig,
    ScoreConfig,
    add_arguments,
    from_args,
)
from threeds.io.data import read_data, require_records
from threeds.stages.pipeline import score_run


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
    for config in (DataConfig, ModelConfig, ScoreConfig, EngineConfig):
        add_arguments(parser, config)
    parser.add_argument("--overwrite", action="store_true", help="replace scores made with another configuration")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    score, model, engine = (from_args(cls, args) for cls in (ScoreConfig, ModelConfig, EngineConfig))
    records, rejects = read_data(args.data, from_args(DataConfig, args))
    require_records(args.data, records, rejects)
    manifest = score_run(records, args.out, score, model, engine, data_path=str(args.data), rejects=rejects,
                         overwrite=args.overwrite)  # fmt: skip
    print(json.dumps({"run": str(args.out), "timings": manifest.get("timings"), "report": manifest.get("report")}, indent=2))
    return 0
