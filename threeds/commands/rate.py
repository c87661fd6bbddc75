"""`threeds rate`: Stage 1, the target model rates each pair 0-100 (ratings JSONL)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from threeds.commands.common import print_summary
from threeds.config import (
    BackendConfig,
    DataConfig,
    ModelConfig,
    RateConfig,
    RunConfig,
    add_arguments,
    from_args,
)
from threeds.errors import RECORDS_FAILED
from threeds.io.data import read_data, require_records
from threeds.io.lock import locked
from threeds.stages.pipeline import make_backend
from threeds.stages.rate import load_rating_prompt, rate_records, rating_prompt_name

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rate",
        help="Stage 1: the target model rates each (instruction, answer) pair 0-100",
        description="Ask the target model to rate each pair 0-100 on question complexity, answer relevance, "
        "thoroughness, logic and domain knowledge (3DS Stage 1). One JSONL row per record (id, score, raw "
        "reply, backend, model, seconds, error) is appended the moment it is ready; run the same command "
        "again to resume or to retry failures. Then `threeds filter` keeps the high ones.",
    )  # fmt: skip
    parser.add_argument("--data", required=True, type=Path, help="records: JSON, JSONL, Parquet or CSV")
    parser.add_argument("--out", required=True, type=Path, help="ratings JSONL")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo ratings the file holds from another model, prompt or settings")  # fmt: skip
    add_arguments(parser, DataConfig)
    add_arguments(parser, RateConfig)
    add_arguments(parser, ModelConfig)
    add_arguments(parser.add_argument_group("backend"), BackendConfig)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    rate, data = from_args(RateConfig, args), from_args(DataConfig, args)
    config = RunConfig(model=from_args(ModelConfig, args), backend=from_args(BackendConfig, args))
    records, rejects = read_data(args.data, data)
    require_records(args.data, records, rejects)
    if rejects:
        log.warning("%d input records rejected, e.g. %s", len(rejects), rejects[0])
    template = load_rating_prompt(rating_prompt_name(rate.prompt, records))
    with locked(args.out.parent):  # before the model loads: a second writer is refused at once
        summary = rate_records(records, make_backend(config), args.out, rate, template=template, overwrite=args.overwrite)
    print_summary(summary)
    return RECORDS_FAILED if summary["failed"] else 0
