"""`threeds select`: percentile bands on the three difficulty metrics, then k-center greedy."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from threeds.data import DataError, write_json
from threeds.rundir import RunError
from threeds.select import select_run, selected_records

log = logging.getLogger(__name__)

FLAG_NAMES = {"ins_ppl": "ins", "gen_wloss": "conf", "gt_wloss": "corr"}
PAPER_NAMES = {
    "ins_ppl": "Instruction Understanding (prompt perplexity)",
    "gen_wloss": "Response Confidence (weighted loss of the model's own answer A')",
    "gt_wloss": "Response Correctness (weighted loss of the ground truth A)",
}


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    """Band and k-center flags, with the original release's names and defaults (also for `threeds run`)."""
    parser.add_argument("--low-th", type=float, default=25.0,
                        help="lower percentile of every metric's band: easier samples are dropped (default: 25)")
    parser.add_argument("--up-th", type=float, default=75.0,
                        help="upper percentile of every metric's band: harder samples are dropped (default: 75)")
    for metric, short in FLAG_NAMES.items():
        parser.add_argument(f"--{short}-low", type=float, default=None, help=f"lower percentile for {PAPER_NAMES[metric]}")
        parser.add_argument(f"--{short}-up", type=float, default=None, help=f"upper percentile for {PAPER_NAMES[metric]}")
    parser.add_argument("--sample-num", type=int, default=5000,
                        help="how many samples k-center greedy picks among the band survivors (default: 5000)")
    parser.add_argument("--atten-method", choices=["mean", "max"], default="mean",
                        help="how last-layer attention is aggregated per key token over query rows "
                        "before the head mean (default: mean)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the first k-center centre (default: 0)")


def bands_from_args(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Per-metric (low, high) percentiles: a metric's own flag wins over --low-th/--up-th."""
    bands = {}
    for metric, short in FLAG_NAMES.items():
        low, high = getattr(args, f"{short}_low"), getattr(args, f"{short}_up")
        bands[metric] = (args.low_th if low is None else low, args.up_th if high is None else high)
    return bands


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
    add_select_arguments(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        result = select_run(args.run, bands_from_args(args), args.sample_num, args.atten_method, args.seed)
        records = selected_records(args.run, result["selected_ids"])
    except (DataError, RunError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    write_json(args.out, records)
    print(json.dumps({"selected": len(records), "out": str(args.out), "report": result["report"]}, indent=2, default=str))
    return 0
