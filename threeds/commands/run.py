"""`threeds run`: the whole of 3DS in one run directory, rate -> filter -> generate -> score -> select
(`threeds.stages.pipeline` does the work; this module is its command line)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from threeds.config import (
    RUN_FLAGS,
    BackendConfig,
    DataConfig,
    EngineConfig,
    FilterConfig,
    GenerateConfig,
    ModelConfig,
    PreflightConfig,
    RateConfig,
    RunConfig,
    ScoreConfig,
    SelectConfig,
    SubsetConfig,
    add_arguments,
    from_args,
)  # fmt: skip
from threeds.rundir import layout
from threeds.rundir.lifecycle import run_lifecycle
from threeds.rundir.progress import ProgressFile
from threeds.rundir.write import RunDir
from threeds.stages.outcome import run_outcome
from threeds.stages.pipeline import run_pipeline

log = logging.getLogger(__name__)

# The parts of RunConfig, and the help group each one's flags are listed under.
GROUPS = {
    "data": (DataConfig, None), "subset": (SubsetConfig, "a small run first"), "preflight": (PreflightConfig, "a small run first"),
    "model": (ModelConfig, None), "backend": (BackendConfig, "backend"),
    "rate": (RateConfig, "stage 1: rating"), "filter": (FilterConfig, "stage 1: rating"),
    "generate": (GenerateConfig, "stage 2: A' generation, scoring and selection"),
    "score": (ScoreConfig, "stage 2: A' generation, scoring and selection"),
    "engine": (EngineConfig, "stage 2: A' generation, scoring and selection"),
    "select": (SelectConfig, "stage 2: A' generation, scoring and selection"),
}  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="all of 3DS in one go: rate -> filter -> generate -> score -> select",
        description="Run 3DS end to end into one run directory: Stage 1 (the target model rates each pair, keep "
        "scores >= --quality-threshold), then A' generation, Stage 2 scoring and selection. The selected "
        "records are written to OUT/selected.json. Run the same command again to resume; a stage whose "
        "output is current is skipped, and changing a setting redoes that stage and the ones after it.",
    )  # fmt: skip
    parser.add_argument("--data", required=True, type=Path, help="records: JSON, JSONL, Parquet or CSV")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: cache/<data file name>)")
    groups: dict[str | None, argparse._ActionsContainer] = {None: parser}
    for cls, title in GROUPS.values():
        group = groups.setdefault(title, parser.add_argument_group(title))
        add_arguments(group, cls, RUN_FLAGS.get(cls))
    parser.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Every setting checked before any file is read: SettingsError (exit status 2) naming the first bad flag."""
    return RunConfig(**{name: from_args(cls, args, RUN_FLAGS.get(cls)) for name, (cls, _) in GROUPS.items()})


def main(args: argparse.Namespace) -> int:
    """Run the pipeline and record how it ended in OUT/status.json (done, done with failures, stopped,
    failed); the last line printed says the same."""
    out = args.out or Path("cache") / args.data.stem
    with run_lifecycle(out) as ending:  # status.json is the run's own: its end is recorded before the lock goes
        ProgressFile(out / layout.PROGRESS, "start", 0, ahead=[]).phase("reading the data")  # a phase line from the first second
        config = config_from_args(args)  # refused settings are recorded as the run's end too
        result = run_pipeline(args.data, RunDir(out), config)
        outcome = run_outcome(result, config.select)
        ending.state, ending.exit_code, ending.failures = outcome.state, outcome.exit_code, outcome.failures
        ending.error = outcome.line if outcome.exit_code else None
    print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    (log.warning if outcome.exit_code else log.info)("%s", outcome.line)
    return outcome.exit_code
