"""What an experiment arm no longer does before its evaluation (BENCHMARKS.md (i2), issue 29).

Before: the runner loaded the base model again and merged the adapter it had just saved
(`load_model(spec, adapter)`); now it merges the LoRA of the model it just trained, in memory
(`threeds.model.lora.merged`). Times both on the embedded SmolLM2-135M in float32 with a LoRA of
the paper's settings on every linear layer, interleaved, and checks that both give the same weights.

    python bench/arm_eval_load.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threeds.config import TrainConfig  # noqa: E402
from threeds.model.load import load_model  # noqa: E402
from threeds.model.lora import add_lora, merged  # noqa: E402


def trained(folder: Path) -> torch.nn.Module:
    """The embedded model with a LoRA whose B is not zero (as after training), saved to `folder`."""
    model, _ = load_model(None, dtype="float32", device="cpu")
    peft = add_lora(model, TrainConfig())
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    peft.save_pretrained(folder)
    return peft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {"reload base + saved adapter (before)": [], "merge in memory (now)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            peft = trained(Path(tmp))
            start = time.perf_counter()
            now = merged(peft)
            seconds["merge in memory (now)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            before, _ = load_model(None, tmp, "float32", device="cpu")
            seconds["reload base + saved adapter (before)"].append(time.perf_counter() - start)
            same = all(torch.equal(a, b) for a, b in zip(now.state_dict().values(), before.state_dict().values(), strict=True))
            if not same:
                raise SystemExit("the two paths gave other weights")
    print(json.dumps({"rounds": args.rounds, "threads": torch.get_num_threads(), "same_weights": True,
                      "load_average": [round(load, 1), round(os.getloadavg()[0], 1)],
                      **{k: {"median_s": round(statistics.median(v), 3), "all_s": [round(x, 3) for x in v]} for k, v in seconds.items()}},
                     indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
