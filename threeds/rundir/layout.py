"""Every file and folder threeds writes, named once: a run directory (`cache/<run>/`), an
experiment inside it (`experiments/NAME/`), a training folder and an evaluation folder.

Readers and writers, in the library and the app, take the names from here, so renaming a file is
one line and a grep for a constant finds everyone who touches that file. What each file holds:
docs/DESIGN.md, "Run directory". `tests/test_layout.py` checks that no other module spells a file
name (names other programs gave their files are spelled once, by the module that reads them).
"""

from __future__ import annotations

from pathlib import Path

from threeds.io.lock import LOCK_FILE

MANIFEST = "manifest.json"  # config, model, data, stages, timings, report
REJECTS = "rejects.jsonl"  # input records that could not be read
RATINGS = "ratings.jsonl"  # Stage 1's job log
FILTERED = "filtered.jsonl"  # records rated at or above the threshold
GENERATIONS = "generations.jsonl"  # A' job log
DATA = "data.jsonl"  # the records as scored, in the order of METRICS
DATA_INDEX = ("data_index.npy", "data_index.json")  # where each record of DATA starts: offsets, description
METRICS = "metrics.parquet"
EMBEDDINGS = "embeddings.npy"
TOKENS = "tokens.parquet"
SELECTION = "selection.json"  # settings, report and picked ids of `threeds select`
SELECTED = "selected.json"  # the picked records (`threeds run`)
PROXY_CHECK = "proxy_check.json"  # `threeds proxy-check`: a proxy's agreement with a target run
PROXY_REPORT = "proxy_check.md"  # the same, as a report in words
PROGRESS = "progress.json"
STATUS = "status.json"
JOB = "job.json"  # pid and command of a run the app started
LOG = "run.log"  # that run's stdout and stderr
LOCK = LOCK_FILE
CHUNKS = "chunks"  # scoring's partial results
CHUNK_EMBEDDINGS = "emb.npy"  # a chunk's part beside its TOKENS and METRICS: chunks/000003.emb.npy
PICK_ORDERS = "pick_orders"  # k-center orders (io.array_cache pairs)
PRESETS = "selections"  # named selections saved by the app
UMAP = ("umap.npy", "umap.json")  # the app's 2-D map: array, description
REPEAT_SHARES = ("repeat_shares.npy", "repeat_shares.json")  # A' checks per sample (repeat share, blank): array, description (Stage 2 writes them)
SOURCES = ("sources.npy", "sources.json")  # each scored record's source: codes, description with the names (Stage 2 writes them beside DATA_INDEX)
# The app's background k-center job (a temporary folder; threeds.selection.pick_job): its inputs,
# its picks and its output, beside a PROGRESS file
PICK_JOB_INPUTS = ("candidates.npy", "initial.npy")
PICK_JOB_PICKS, PICK_JOB_LOG = "picks.npy", "job.log"

SCORED = (METRICS, EMBEDDINGS, DATA)  # what `threeds select` needs
SCORE_OUTPUTS = (DATA, EMBEDDINGS, TOKENS, METRICS)  # what scoring consolidates, in the order written: metrics last

# An experiment: RUN/experiments/NAME/ (threeds.outcomes.experiment); progress, status and the lock
# are named as in a run directory.
EXPERIMENTS = "experiments"
EXPERIMENT = "experiment.json"  # settings, model, arms and their sizes per seed
UNITS = "units.json"  # each arm x seed's state and seconds
EXPERIMENT_SUMMARY = "summary.json"  # the statistics over the arms
REPORT_MD, REPORT_CSV = "report.md", "report.csv"
UNIT_FOLDERS = {"train": "arms", "eval": "evals"}  # arms/ARM/seedK/: a training; evals/ARM/seedK/: its evaluation

# A training folder (`threeds train --out`, an experiment's arms/ARM/seedK/); the adapter's own files
# are PEFT's (threeds.model.load).
LOSS = "loss.jsonl"  # one row per optimizer step
TRAIN_SUMMARY = "train.json"  # written when the training finished
TRAIN_CONFIG = "train_config.json"  # settings, model, package versions
IDS = "ids.json"  # the seed, the ids and their training order
CHECKPOINT = "checkpoint.json"  # points at the last complete checkpoint folder
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-STEP/: CHECKPOINT_ADAPTER and CHECKPOINT_OPTIMIZER
CHECKPOINT_ADAPTER, CHECKPOINT_OPTIMIZER = "adapter.safetensors", "optimizer.safetensors"
LLAMAFACTORY = "llamafactory"  # LF_DATA, LF_DATASET_INFO, LF_YAML and LF_OUTPUT, for llamafactory-cli
LF_DATA, LF_DATASET_INFO, LF_YAML, LF_OUTPUT = "threeds_train.json", "dataset_info.json", "train.yaml", "output"

# An evaluation folder (`threeds eval --out`, an experiment's evals/ARM/seedK/).
ITEMS = "items.jsonl"  # one row per item, appended after each batch
EVAL_SUMMARY = "summary.json"
EVAL_CONFIG = "config.json"  # the settings the rows depend on


def unit_dir(exp: Path, kind: str, arm: str, seed: int) -> Path:
    """The training (`kind` "train") or evaluation ("eval") folder of one arm x seed of experiment `exp`."""
    return Path(exp) / UNIT_FOLDERS[kind] / arm / f"seed{seed}"
