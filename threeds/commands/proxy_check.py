"""`threeds proxy-check`: would a smaller model pick what the target model picks? (issue 33)"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from threeds.config import BackendConfig, ScoreConfig
from threeds.errors import RECORDS_FAILED, SettingsError
from threeds.io.atomic import atomic_write
from threeds.rundir import layout
from threeds.selection.proxy_agreement import Gates
from threeds.stages.proxy_check import ANSWERS, CheckConfig, run_check
from threeds.views.proxy_report import markdown

log = logging.getLogger(__name__)

EPILOG = """\
exit status: 0 the check ran and the proxy passes its gates; 3 it ran and the proxy fails them or the
sample cannot tell (the verdict says which, in OUT/proxy_check.json and .md); 1 bad input (not a
scored run, an unreadable file); 2 a bad flag; 4 OUT is being written by another process; 5 the
system refused a read or write; 130 interrupted (run the same command again: scoring resumes).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "proxy-check",
        help="score a target run's records with a smaller proxy model and measure whether it picks the same",
        description="RUN is a run scored by the target model on a sample of the pool (threeds sample, then "
        "threeds run). The proxy scores the same records with the same settings into OUT (a run directory of its "
        "own), with the target's A' (--answers target) or its own (--answers proxy, what a proxy-only run of the "
        "pool does); then the two are compared with 95%% intervals: Spearman's rho of each metric (Fisher z, "
        "Bonett-Wright variance) and of the k-center pick orders, Cohen's kappa of the band decisions, the overlap "
        "of the selections beside chance, the shift by source, the time per record and for the pool, and a verdict "
        "with its gates. Results: OUT/proxy_check.json and OUT/proxy_check.md.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--run", required=True, type=Path, help="the target model's scored run on the sample")
    parser.add_argument("--proxy", required=True, help="the proxy model: a local directory, a hub id or a .gguf file")
    parser.add_argument("--out", required=True, type=Path, help="run directory for the proxy's scores and the check")
    parser.add_argument("--answers", choices=ANSWERS, default="target",
                        help="A' scored by the proxy: the target's (default) or its own, generated first")  # fmt: skip
    parser.add_argument("--pool-size", type=int, default=None,
                        help="records in the whole pool: scales the run's sample_num to the sample and projects the "
                        "time of scoring the pool (default: unknown; k = 10%% of the sample, times for the sample)")  # fmt: skip
    parser.add_argument("--sample-num", type=int, default=None, help="k-center picks compared (default: scaled, above)")
    parser.add_argument("--min-rho", type=float, default=Gates.min_rho,
                        help=f"gate: Spearman's rho of every metric at least this (default: {Gates.min_rho:g})")  # fmt: skip
    parser.add_argument("--min-vs-chance", type=float, default=Gates.min_vs_chance,
                        help="gate: the share of the target's picks the proxy also picks at least this many times "
                        f"chance (default: {Gates.min_vs_chance:g})")  # fmt: skip
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="the proxy's precision (default: auto)")
    parser.add_argument("--batch-tokens", type=int, default=ScoreConfig.batch_tokens, help="scoring's token budget per batch")
    parser.add_argument("--batch-size", type=int, default=BackendConfig.batch_size, help="--answers proxy: answers decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="--answers proxy: longest A' (default: the target run's)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace scores OUT holds from another model or settings")
    parser.set_defaults(func=main)


def check_config(args: argparse.Namespace) -> CheckConfig:
    """The flags as a CheckConfig; SettingsError (exit status 2) naming the first bad one."""
    for flag, value in (("--pool-size", args.pool_size), ("--sample-num", args.sample_num), ("--batch-tokens", args.batch_tokens),
                        ("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):  # fmt: skip
        if value is not None and value < 1:
            raise SettingsError(f"{flag} {value}: must be at least 1")
    if not -1 <= args.min_rho <= 1:
        raise SettingsError(f"--min-rho {args.min_rho:g}: must be within -1 to 1")
    if not args.min_vs_chance > 0:
        raise SettingsError(f"--min-vs-chance {args.min_vs_chance:g}: must be more than 0")
    return CheckConfig(
        proxy=args.proxy, answers=args.answers, pool_size=args.pool_size, sample_num=args.sample_num,
        gates=Gates(args.min_rho, args.min_vs_chance), dtype=args.dtype, batch_tokens=args.batch_tokens,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    result = run_check(args.run, args.out, check_config(args), overwrite=args.overwrite)
    report = args.out / layout.PROXY_REPORT
    atomic_write(report, lambda f: f.write(markdown(result)), mode="w")
    decided = result["verdict"]
    print(json.dumps({"check": str(args.out / layout.PROXY_CHECK), "report": str(report), "verdict": decided["verdict"],
                      "checks": decided["checks"]}, indent=2))  # fmt: skip
    (log.info if decided["passed"] else log.warning)("proxy check: %s: %s", decided["verdict"], decided["words"])
    return 0 if decided["passed"] else RECORDS_FAILED
