"""`threeds experiment`: does the selection help? Train arms x seeds, evaluate each, compare with statistics."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from threeds.config import ExperimentConfig, TrainConfig, add_arguments, from_args
from threeds.rundir import layout
from threeds.rundir.lifecycle import run_lifecycle

log = logging.getLogger(__name__)

EPILOG = """\
example: the run's selection against a random subset of the same size, 3 seeds, on MMLU's medical subjects
  threeds experiment --run cache/demo --name sel-vs-random --arm sel=current --arm rand=random:same \\
      --seeds 3 --bench mmlu-medical
`current` is the run's selection.json as `threeds select` last wrote it (the app's Outcomes page trains its
sidebar's selection instead, saved as a preset at Start); the baseline is the first random arm unless
--baseline names another; `random:length` matches the first arm's response lengths.
Files go to RUN/experiments/NAME/ (experiment.json, arms/, evals/, summary.json, report.md, report.csv).
Running the same command again reuses every finished training and evaluation and resumes a killed one;
an --arm added later is trained and evaluated alone. The app's Outcomes page starts, follows and shows it.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experiment", help="train and evaluate several selections (arms) and compare them with honest statistics",
        description="Train the run's model with LoRA on every arm x seed, evaluate each by log-likelihood multiple "
        "choice, and compare the arms with the baseline: accuracy with a bootstrap CI, the paired difference with "
        "Newcombe's interval, McNemar's exact test (Holm-corrected), how many items differ and the smallest "
        "difference the exact test can call with this many items.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--run", required=True, type=Path, help="run directory the arms are drawn from")
    add_arguments(parser, ExperimentConfig)
    add_arguments(parser.add_argument_group("training of every arm (threeds train's flags)"), TrainConfig)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from threeds.outcomes.experiment import (  # torch: not for `threeds --help`
        experiment_dir,
        run_experiment,
    )

    config, train = from_args(ExperimentConfig, args), from_args(TrainConfig, args)
    exp = experiment_dir(args.run, config.name)
    with run_lifecycle(exp):  # status.json is the experiment's own: its end is recorded before the lock goes
        run_experiment(args.run, config, train, say=log.info)
    print((exp / layout.REPORT_MD).read_text(encoding="utf-8"))
    print(json.dumps({"summary": str(exp / layout.EXPERIMENT_SUMMARY), "report": str(exp / layout.REPORT_MD)}, indent=2))
    return 0
