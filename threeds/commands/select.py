"""`threeds select`: percentile bands on the three difficulty metrics, then k-center greedy."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from threeds.errors import RECORDS_FAILED
from threeds.io.atomic import check_writable
from threeds.io.data import write_json
from threeds.rundir.check import selected_records
from threeds.selection.apply import (
    add_select_flags,
    config_from_args,
    empty_reason,
    select_dir,
)

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "select",
        help="keep samples of moderate difficulty on all three metrics, then pick a diverse set",
        description="3DS selection on a scored run: keep samples inside a percentile band on each of the three "
        "metrics (Instruction Understanding, Response Confidence, Response Correctness), intersect, then "
        "k-center greedy on the instruction embeddings picks --sample-num of them. Works on any directory "
        "holding data.jsonl, metrics.parquet and embeddings.npy.",
    )  # fmt: skip
    parser.add_argument("--run", required=True, type=Path, help="run directory made by `threeds score`")
    parser.add_argument("--out", required=True, type=Path, help="selected records, written as a JSON array")
    add_select_flags(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args, args.run)
    check_writable(args.out)  # before selection.json is replaced: a bad --out leaves the run as it was
    result = select_dir(args.run, config)
    records = selected_records(args.run, result["selected_ids"])
    write_json(args.out, records)
    print(json.dumps({"selected": len(records), "out": str(args.out), "report": result["report"]}, indent=2, default=str))
    if not records:
        log.warning("0 samples selected: %s", empty_reason(config, result["report"]["funnel"]))
        return RECORDS_FAILED
    return 0
