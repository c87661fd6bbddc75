"""Every file and folder of a run directory (`cache/<run>/`), named once.

Readers and writers, in the library and the app, take the names from here, so renaming a run file
is one line and a grep for a constant finds everyone who touches that file. What each file holds:
docs/DESIGN.md, "Run directory". `tests/test_layout.py` checks that no other module spells a name.
"""

from __future__ import annotations

from threeds.io.lock import LOCK_FILE

MANIFEST = "manifest.json"  # config, model, data, stages, timings, report
REJECTS = "rejects.jsonl"  # input records that could not be read
RATINGS = "ratings.jsonl"  # Stage 1's job log
FILTERED = "filtered.jsonl"  # records rated at or above the threshold
GENERATIONS = "generations.jsonl"  # A' job log
DATA = "data.jsonl"  # the records as scored, in the order of METRICS
METRICS = "metrics.parquet"
EMBEDDINGS = "embeddings.npy"
TOKENS = "tokens.parquet"
SELECTION = "selection.json"  # settings, report and picked ids of `threeds select`
SELECTED = "selected.json"  # the picked records (`threeds run`)
PROGRESS = "progress.json"
STATUS = "status.json"
JOB = "job.json"  # pid and command of a run the app started
LOG = "run.log"  # that run's stdout and stderr
LOCK = LOCK_FILE
CHUNKS = "chunks"  # scoring's partial results
PICK_ORDERS = "pick_orders"  # k-center orders (io.array_cache pairs)
PRESETS = "selections"  # named selections saved by the app
UMAP = ("umap.npy", "umap.json")  # the app's 2-D map: array, description
REPEAT_SHARES = ("repeat_shares.npy", "repeat_shares.json")  # A' repeat rule per sample: array, description

SCORED = (METRICS, EMBEDDINGS, DATA)  # what `threeds select` needs
SCORE_OUTPUTS = (DATA, EMBEDDINGS, TOKENS, METRICS)  # what scoring consolidates, in the order written: metrics last
