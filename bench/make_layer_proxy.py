"""A real smaller proxy of the embedded SmolLM2-135M-Instruct: K of its 30 decoder layers kept.

    python bench/make_layer_proxy.py --keep 15 --out cache/models/smollm2-cut15

Deterministic (`threeds.model.layer_cut`): layers round(i * 29 / (K - 1)), i = 0..K-1, so the first
and the last are always kept; embeddings, final norm and head unchanged. Writes config.json,
model.safetensors and the tokenizer into --out (config.json's `layer_cut` names the kept layers), loadable with
`--model DIR` / `threeds proxy-check --proxy DIR`. A few seconds on a CPU (the embedded model's
one-time GGUF conversion aside). BENCHMARKS.md (w) gives what the check says about it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threeds.model.layer_cut import save_cut  # noqa: E402
from threeds.model.files import model_label  # noqa: E402
from threeds.model.load import load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=int, required=True, help="decoder layers kept, evenly spaced (SmolLM2-135M has 30)")
    parser.add_argument("--out", type=Path, required=True, help="model directory written")
    parser.add_argument("--model", default=None, help="the model cut (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    described = save_cut(model, tokenizer, args.keep, args.out, model_label(args.model))
    print(json.dumps({"out": str(args.out), **described}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
