"""`threeds eval`: accuracy of a model (and LoRA adapter) on a multiple-choice set, by log-likelihood."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from threeds.config import EvalConfig, ModelConfig, add_arguments, from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="accuracy on a multiple-choice set (MMLU medical, PubMedQA, your file) by log-likelihood",
        description="Score every choice of every item as the continuation of the prompt (no generation; the "
        "prompt is computed once for all of an item's choices): acc (highest summed log-probability), acc_norm "
        "(per character), gold_prob (softmax over the per-character scores). Writes --out/items.jsonl (one row "
        "per item, appended as batches finish: run the same command again to resume) and --out/summary.json.",
    )  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="output folder, e.g. cache/eval/base")
    add_arguments(parser, EvalConfig)
    add_arguments(parser, ModelConfig)
    parser.add_argument("--overwrite", action="store_true", help="replace an evaluation made with other settings")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    # torch and transformers: not for `threeds --help`
    from threeds.model.load import load_model
    from threeds.outcomes.benchsets import load_bench
    from threeds.outcomes.evaluate import check_shots, evaluate

    config, spec = from_args(EvalConfig, args), from_args(ModelConfig, args)
    bench = load_bench(config.bench, config.limit)  # a bad set, or too few dev items for --shots, fails before the model loads
    check_shots(bench, config.shots)
    model, tokenizer = load_model(spec.model, config.adapter, spec.dtype)
    summary = evaluate(model, tokenizer, bench, args.out, config, spec, progress=True, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0
