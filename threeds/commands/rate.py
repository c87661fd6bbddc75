"""`threeds rate`: Stage 1, the target model rates each pair 0-100 (ratings JSONL)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from threeds.commands.generate import EXPECTED_ERRORS, add_backend_arguments, backend_from_args, print_summary
from threeds.commands.score import add_data_arguments
from threeds.data import read_records
from threeds.rate import PROMPT_NAMES, PromptError, load_rating_prompt, rate_records

log = logging.getLogger(__name__)


def add_rating_arguments(parser: argparse.ArgumentParser, tokens_flag: str = "--max-new-tokens") -> None:
    """Rating prompt and reply flags (also used by `threeds run`, with its own name for the token flag)."""
    parser.add_argument(
        "--prompt", default="en-medical",
        help=f"rating prompt: one of {', '.join(PROMPT_NAMES)} (zh-medical is the paper's setting), or a text file "
        "with {instruction} and {output} slots (default: en-medical)",
    )  # fmt: skip
    parser.add_argument(tokens_flag, dest="rate_max_new_tokens", type=int, default=16,
                        help="longest rating reply in tokens; the score is the first number in it (default: 16)")  # fmt: skip
    parser.add_argument("--reasks", type=int, default=2,
                        help="times a reply without a score is asked again, with a reminder, before it is "
                        "recorded as a failure (default: 2)")  # fmt: skip


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
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, type=Path,
                        help="ratings JSONL; progress.json is written beside it")  # fmt: skip
    add_rating_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="redo ratings the file holds from another model, prompt or settings")  # fmt: skip
    add_backend_arguments(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        template = load_rating_prompt(args.prompt)
        records, rejects = read_records(args.data, args.duplicate_ids)
        if rejects:
            log.warning("%d input records rejected, e.g. %s", len(rejects), rejects[0])
        summary = rate_records(records, backend_from_args(args), args.out, template, args.rate_max_new_tokens,
                               reasks=args.reasks, overwrite=args.overwrite)  # fmt: skip
    except (PromptError, *EXPECTED_ERRORS) as exc:
        log.error("%s", exc)
        return 1
    print_summary(summary)
    return 0 if not summary["failed"] else 3
