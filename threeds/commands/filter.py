"""`threeds filter`: keep the records the model rated at or above the threshold (Stage 1)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from threeds.config import DataConfig, FilterConfig, add_arguments, from_args
from threeds.io.data import read_data, read_jsonl, write_records
from threeds.stages.rate import filter_by_rating

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "filter",
        help="Stage 1: keep records rated >= --quality-threshold",
        description="Keep the records whose rating (from `threeds rate`) is at least --quality-threshold. "
        "Records without a valid rating are left out and counted as unrated.",
    )  # fmt: skip
    parser.add_argument("--data", required=True, type=Path, help="the records that were rated")
    parser.add_argument("--ratings", required=True, type=Path, help="ratings JSONL written by `threeds rate`")
    parser.add_argument("--out", required=True, type=Path,
                        help="kept records: a JSON array, or JSON Lines if it ends in .jsonl")  # fmt: skip
    add_arguments(parser, DataConfig)
    add_arguments(parser, FilterConfig)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    threshold = from_args(FilterConfig, args).quality_threshold
    records, _ = read_data(args.data, from_args(DataConfig, args))
    kept, report = filter_by_rating(records, read_jsonl(args.ratings), threshold)
    write_records(args.out, kept)
    if report["unrated"]:
        log.warning("%d records have no valid rating and were left out; rerun `threeds rate` to retry them",
                    report["unrated"])  # fmt: skip
    print(json.dumps({**report, "out": str(args.out)}, indent=2))
    return 0
