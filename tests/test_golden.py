"""Golden test: one whole `threeds run` on a fixed small input with the embedded model, against tests/golden/.

What must hold on any machine:
- exact: ratings (score and raw reply), A' texts, the selected ids in pick order, the selected records,
  and every id, text, count and flag column of metrics.parquet and tokens.parquet;
- within `RTOL`/`ATOL` (below): the float columns (losses, attention weights, perplexities) and the
  embeddings. Another CPU runs the same float32 kernels with other vector widths and blockings, so
  its sums are taken in another order and differ in the last bits.
- bit for bit: everything, when this machine and build equal the fingerprint the goldens were
  written with (`fingerprint.json`: CPU model and vector flags, thread count, Python, torch and its
  build, numpy, transformers). Then a change in the last bit is a change of the code.

After an intended change of numbers, regenerate on a quiet machine with
`THREEDS_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py` (it also rewrites the
fingerprint) and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from threeds.cli import main as cli

GOLDEN = Path(__file__).parent / "golden"
ARGS = ["--max-new-tokens", "24", "--low-th", "10", "--up-th", "90", "--sample-num", "3", "--max-length", "512"]
FRAMES = ("metrics.parquet", "tokens.parquet")
UPDATE = os.environ.get("THREEDS_UPDATE_GOLDEN") == "1"

# Float tolerance, from float32 round-off (unit roundoff u = 2**-24 = 6e-8). A value here is the end of
# ~30 layers of dot products up to n = 1536 terms long (the MLP's width); a reordered sum of n terms
# moves by about sqrt(n) * u relative to its terms, which over 30 layers is 30 * 39 * 6e-8 = 7e-5,
# the largest difference measured between two x86 CPUs (relative, per-token losses). RTOL leaves
# 3x that. Values near zero come out of sums of terms of order 1 (an embedding element, a loss that
# is the difference of two log-sums of logits ~20), so their error is absolute: n * u = 1e-4 bounds
# it (measured: 1.7e-5 on the embeddings). A change of the method moves a metric by far more (one
# token more or less in a weighted loss: percents).
RTOL = 2e-4
ATOL = 1e-4
SIMD_FLAG = re.compile(r"^(sse|ssse|avx|amx|fma|f16c|bf16|vnni|asimd|sve|neon)")


def fingerprint() -> dict:
    """What decides the float kernels' summation order: the CPU, the thread count and the build."""
    import numpy
    import torch
    import transformers

    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", cpu, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", cpu, re.M)
    return {
        "machine": platform.machine(),
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cpu_flags": sorted(f for f in (flags.group(1).split() if flags else []) if SIMD_FLAG.match(f)),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_build": hashlib.sha256(torch.__config__.show().encode()).hexdigest()[:16],
        "numpy": numpy.__version__,
        "transformers": transformers.__version__,
    }


def same_build() -> bool:
    path = GOLDEN / "fingerprint.json"
    return path.exists() and json.loads(path.read_text()) == fingerprint()


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


def assert_frames_match(got: pd.DataFrame, want: pd.DataFrame, exact: bool) -> None:
    """Every non-float column equal; float columns equal (`exact`) or within RTOL/ATOL."""
    if exact:
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        return
    floats = [c for c in want.columns if pd.api.types.is_float_dtype(want[c])]
    pd.testing.assert_frame_equal(got.drop(columns=floats), want.drop(columns=floats), check_exact=True)
    for column in floats:
        assert got[column].dtype == want[column].dtype, column
        assert_close(got[column].to_numpy(), want[column].to_numpy(), column)


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=what)


def assert_arrays_match(got: np.ndarray, want: np.ndarray, exact: bool) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if exact:
        assert got.tobytes() == want.tobytes()
    else:
        assert_close(got, want, "embeddings")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("golden") / "run"
    assert cli(["run", "--data", str(GOLDEN / "input.jsonl"), "--out", str(run), *ARGS]) == 0
    if UPDATE:
        for name in (*FRAMES, "embeddings.npy"):
            shutil.copy(run / name, GOLDEN / name)
        (GOLDEN / "texts.json").write_text(json.dumps(_texts(run), indent=1, ensure_ascii=False) + "\n")
        (GOLDEN / "fingerprint.json").write_text(json.dumps(fingerprint(), indent=1) + "\n")
    return run


@pytest.mark.integration
def test_ratings_answers_and_selection_are_unchanged(run_dir):
    assert _texts(run_dir) == json.loads((GOLDEN / "texts.json").read_text())


@pytest.mark.integration
@pytest.mark.parametrize("name", FRAMES)
def test_metric_and_token_tables_are_unchanged(run_dir, name):
    assert_frames_match(pd.read_parquet(run_dir / name), pd.read_parquet(GOLDEN / name), exact=same_build())


@pytest.mark.integration
def test_embeddings_are_unchanged(run_dir):
    assert_arrays_match(np.load(run_dir / "embeddings.npy"), np.load(GOLDEN / "embeddings.npy"), exact=same_build())


def test_a_metric_moved_beyond_the_tolerance_fails():
    """The comparison is not vacuous: a metric moved by 1e-3 (5x RTOL) fails, round-off passes."""
    want = pd.read_parquet(GOLDEN / "metrics.parquet")
    moved = want.copy()
    moved.loc[3, "gt_wloss_mean"] *= 1 + 1e-3
    with pytest.raises(AssertionError, match="gt_wloss_mean"):
        assert_frames_match(moved, want, exact=False)
    rounded = want.copy()
    rounded["gt_wloss_mean"] *= 1 + 1e-5
    assert_frames_match(rounded, want, exact=False)
    with pytest.raises(AssertionError):
        assert_frames_match(rounded, want, exact=True)


def test_a_count_or_an_embedding_moved_fails():
    """Counts are exact even across machines; an embedding element moved past ATOL fails."""
    want = pd.read_parquet(GOLDEN / "tokens.parquet")
    moved = want.copy()
    moved.loc[0, "end"] += 1
    with pytest.raises(AssertionError):
        assert_frames_match(moved, want, exact=False)
    emb = np.load(GOLDEN / "embeddings.npy")
    near_zero = emb.copy()
    near_zero.flat[np.abs(emb).argmin()] += np.float32(5e-4)
    with pytest.raises(AssertionError, match="embeddings"):
        assert_arrays_match(near_zero, emb, exact=False)
    assert_arrays_match(emb + np.float32(1e-5), emb, exact=False)


def test_bit_for_bit_only_on_the_goldens_own_build(monkeypatch):
    """The stored fingerprint turns the exact comparison on; any one field that differs turns it off."""
    stored = json.loads((GOLDEN / "fingerprint.json").read_text())
    assert set(stored) == set(fingerprint())
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "fingerprint", lambda: dict(stored))
    assert same_build()
    for field in stored:
        monkeypatch.setattr(module, "fingerprint", lambda f=field: {**stored, f: "other"})
        assert not same_build(), field
