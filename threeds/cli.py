"""The `threeds` command line: one subcommand per stage of 3DS."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal

from threeds import __version__
from threeds.commands import COMMANDS
from threeds.errors import USAGE, ThreedsError, describe

log = logging.getLogger("threeds")

# Failures a user can cause and fix: one line, a documented exit status (threeds.errors.EXIT_CODES).
EXPECTED = (ThreedsError, OSError, KeyboardInterrupt)

DESCRIPTION = """\
3DS: Decomposed Difficulty Data Selection (Ding et al., EMNLP 2025).
Select supervised fine-tuning data that fits the target model: Stage 1 keeps pairs the model itself
rates highly; Stage 2 keeps samples of moderate difficulty on three metrics (Instruction
Understanding, Response Confidence, Response Correctness), then k-center greedy picks a diverse set.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threeds", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"threeds {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"threeds.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"threeds.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def honour_interrupts() -> None:
    """Take SIGINT as KeyboardInterrupt even when this process was started with it ignored.

    A program started in the background of a non-interactive shell (`cmd &` in a script, a service
    manager) inherits SIGINT ignored, and Python keeps it so: the app's Stop and Ctrl-C, which ask a
    run to save its work and leave, would go unheeded until SIGTERM, losing what was unsaved.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    honour_interrupts()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        for name in ("httpx", "httpx2"):  # one INFO line per request would bury the progress bar
            logging.getLogger(name).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return USAGE
    try:
        return int(args.func(args) or 0)
    except EXPECTED as exc:
        message, code = describe(exc)
        log.error("%s", message, exc_info=args.debug)
        return code
