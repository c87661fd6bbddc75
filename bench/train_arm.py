"""Time of one experiment arm's training on the CPU (BENCHMARKS.md (h)): `threeds.outcomes.train`
on MedQuAD records with the embedded SmolLM2-135M-Instruct and the paper's settings (r 8, lr 5e-5,
1 epoch, cutoff 1024, batch 4 x 16).

Trains the first `--records` of the bundled 200 MedQuAD records (model load excluded) and prints the
seconds, the records' tokens and the throughput; with fewer than 200 records it also prints the time
200 would take at that throughput, from the exact token count of all 200 (labelled as an estimate).

    python bench/train_arm.py --records 200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threeds.config import TrainConfig  # noqa: E402
from threeds.io.data import read_records  # noqa: E402
from threeds.model.load import load_model  # noqa: E402
from threeds.model.prompts import prompt_format  # noqa: E402
from threeds.outcomes.train import encode_examples, train_lora  # noqa: E402

DATA = ROOT / "threeds" / "sample_data" / "medquad_en_200.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=16)
    args = parser.parse_args()
    records = read_records(DATA, duplicate_ids="rename")[0]
    model, tokenizer = load_model(None)
    fmt = prompt_format(tokenizer)
    config = TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum)
    all_tokens = sum(len(e.ids) for e in encode_examples(records, tokenizer, fmt, config.cutoff))
    part = records[: args.records]
    tokens = sum(len(e.ids) for e in encode_examples(part, tokenizer, fmt, config.cutoff))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = train_lora(model, tokenizer, fmt, part, config, out).summary
        seconds = time.perf_counter() - start
    result = {
        "records": len(part), "steps": summary["steps"], "tokens": tokens, "seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1), "threads": torch.get_num_threads(),
        "tokens_of_200": all_tokens,
    }  # fmt: skip
    if len(part) < len(records):
        result["estimated_seconds_for_200"] = round(all_tokens / (tokens / seconds))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
