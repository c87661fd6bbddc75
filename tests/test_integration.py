"""The real embedded model (SmolLM2-135M-Instruct) on a handful of sample records, end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from threeds.config import ScoreConfig, SelectConfig
from threeds.io.data import read_records
from threeds.model.files import embedded_gguf_path
from threeds.model.load import load_model
from threeds.selection.apply import select_dir
from threeds.stages.pipeline import score_run

pytestmark = pytest.mark.integration
SAMPLE = ROOT / "threeds" / "sample_data" / "medquad_en_200.jsonl"


@pytest.fixture(scope="module")
def embedded():
    return load_model(None)


def test_embedded_model_loads_from_the_package(embedded):
    model, tokenizer = embedded
    assert embedded_gguf_path().name.endswith(".gguf")
    assert model.config.num_hidden_layers == 30 and str(model.dtype) == "torch.float32"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")


def test_score_and_select_sample_records(tmp_path, embedded):
    model, tokenizer = embedded
    records, _ = read_records(SAMPLE, duplicate_ids="rename")
    records = records[:6]
    for r in records:  # a stand-in answer A': the first sentence of A
        r["generated_output"] = r["output"].split(". ")[0] + "."
    manifest = score_run(records, tmp_path, ScoreConfig(max_length=512), loaded=(model, tokenizer), progress=False)
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    assert list(metrics.id) == [r["id"] for r in records]
    # a trained model finds real questions far from random (a random model: about the vocabulary size)
    assert ((metrics.ins_ppl > 1) & (metrics.ins_ppl < 1000)).all()  # random: ~49152
    for col in ("gt_wloss_mean", "gt_wloss_max", "gen_wloss_mean", "gen_wloss_max"):
        assert metrics[col].map(math.isfinite).all() and (metrics[col] > 0).all()
    assert np.load(tmp_path / "embeddings.npy").shape == (6, 576)
    assert manifest["timings"]["score_seconds"] > 0
    result = select_dir(tmp_path, SelectConfig(low_th=0, up_th=100, sample_num=3))
    assert len(result["selected_ids"]) == 3
    saved = json.loads((tmp_path / "selection.json").read_text())
    assert saved["selected_ids"] == result["selected_ids"]
