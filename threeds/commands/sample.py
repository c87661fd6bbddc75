"""`threeds sample`: N records of a pool stratified by source (and length), for a run that anchors a proxy check."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from threeds.config import DataConfig, add_arguments, from_args
from threeds.io.atomic import check_writable
from threeds.io.data import read_data, require_records, write_records
from threeds.io.sampling import stratified_sample


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="N records stratified by source (and length): a small target run to check a proxy model on",
        description="Draw N records from a pool, stratified by a field (default: source) and optionally by "
        "length, so a target-model run on them costs minutes and represents the pool's sources. Each stratum "
        "gets its share of N in proportion to its size (largest remainders round), drawn at random with "
        "--seed; the records keep the pool's order and all their fields. Then `threeds run --data OUT ...` "
        "with the target model and `threeds proxy-check --run RUN --proxy MODEL`.",
    )  # fmt: skip
    parser.add_argument("--data", required=True, type=Path, help="the pool: JSON, JSONL, Parquet or CSV records")
    parser.add_argument("--n", required=True, type=int, help="records to draw (all of them when the pool has fewer)")
    parser.add_argument("--out", required=True, type=Path, help="the sample: a JSON array, or JSON Lines if it ends in .jsonl")
    parser.add_argument("--stratify", default="source", help="the field whose values are the strata (default: source)")
    parser.add_argument("--length-bins", type=int, default=0,
                        help="also stratify by length: this many bins of the pool's record lengths (default: 0, off)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    add_arguments(parser, DataConfig)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    records, rejects = read_data(args.data, from_args(DataConfig, args))
    require_records(args.data, records, rejects)
    sample, report = stratified_sample(records, args.n, args.stratify, args.length_bins, args.seed)
    check_writable(args.out)
    write_records(args.out, sample)
    print(json.dumps({"out": str(args.out), "rejected": len(rejects), **report}, indent=2, ensure_ascii=False))
    return 0
