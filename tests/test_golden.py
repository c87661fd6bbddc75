"""Golden test: one whole `threeds run` on a fixed small input with the embedded model, pinned bit for bit.

Ratings, A', metrics, embeddings, per-token rows and the selection must equal those in
tests/golden/ exactly, so a refactor that changes any number fails here. Float results are
reproducible on one machine and one torch build (CI runs on the session's machine); after an
intended change of numbers, or on other hardware, regenerate with
`THREEDS_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py` and say why in the commit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from threeds.cli import main as cli

pytestmark = pytest.mark.integration
GOLDEN = Path(__file__).parent / "golden"
ARGS = ["--max-new-tokens", "24", "--low-th", "10", "--up-th", "90", "--sample-num", "3", "--max-length", "512"]
FRAMES = ("metrics.parquet", "tokens.parquet")
UPDATE = os.environ.get("THREEDS_UPDATE_GOLDEN") == "1"


def _texts(run: Path) -> dict:
    """The run's text outputs, without timings: ratings, A', selection."""
    def rows(name: str) -> list[dict]:  # by id: the order of a log is the order replies came in
        return sorted((json.loads(line) for line in (run / name).read_text().splitlines()), key=lambda r: r["id"])

    selection = json.loads((run / "selection.json").read_text())
    return {
        "ratings": [{k: r[k] for k in ("id", "score", "raw")} for r in rows("ratings.jsonl")],
        "generations": [{k: r[k] for k in ("id", "generated_output")} for r in rows("generations.jsonl")],
        "selected_ids": selection["selected_ids"],
        "selected": json.loads((run / "selected.json").read_text()),
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("golden") / "run"
    assert cli(["run", "--data", str(GOLDEN / "input.jsonl"), "--out", str(run), *ARGS]) == 0
    if UPDATE:
        for name in (*FRAMES, "embeddings.npy"):
            shutil.copy(run / name, GOLDEN / name)
        (GOLDEN / "texts.json").write_text(json.dumps(_texts(run), indent=1, ensure_ascii=False) + "\n")
    return run


def test_ratings_answers_and_selection_are_unchanged(run_dir):
    assert _texts(run_dir) == json.loads((GOLDEN / "texts.json").read_text())


@pytest.mark.parametrize("name", FRAMES)
def test_metric_and_token_tables_are_bitwise_unchanged(run_dir, name):
    got, want = pd.read_parquet(run_dir / name), pd.read_parquet(GOLDEN / name)
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_embeddings_are_bitwise_unchanged(run_dir):
    got, want = np.load(run_dir / "embeddings.npy"), np.load(GOLDEN / "embeddings.npy")
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()
