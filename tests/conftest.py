"""Shared fixtures: the embedded model's tokenizer, tiny random models built from a config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="session")
def tokenizer():
    from threeds.model.load import load_tokenizer

    return load_tokenizer()


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A random Llama small enough for unit tests; GQA (4 heads, 2 kv heads) like real models."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def tiny_model(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random model saved with the embedded tokenizer, loadable with --model DIR."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Synthetic medical-ish records of varied length, with a generated_output."""
    import random

    rng = random.Random(seed)
    words = "the patient has a fever and cough , which may be caused by infection of the lungs . doctors".split()
    records = []
    for i in range(n):
        def text(k: int) -> str:
            return " ".join(rng.choice(words) for _ in range(k)).capitalize()

        records.append({
            "id": f"r{i}", "instruction": text(rng.randint(3, 20)) + "?",
            "output": text(rng.randint(1, 60)) + ".", "generated_output": text(rng.randint(1, 40)) + ".",
            "source": "synthetic",
        })  # fmt: skip
    return records
