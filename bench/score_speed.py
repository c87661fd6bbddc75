"""Benchmark (a) of BENCHMARKS.md: `threeds` Stage-2 scoring against the naive baseline.

Both paths score the same records with the same model; each runs in its own subprocess so that
peak memory (ru_maxrss) is its own. Model loading is excluded from both times.

    python bench/score_speed.py --n 64            # embedded model, sample data
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "threeds" / "sample_data" / "medquad_en_200.jsonl"
METRICS = ["ins_ppl", "gt_wloss_mean", "gt_wloss_max", "gen_wloss_mean", "gen_wloss_max"]


def bench_records(path: Path, n: int) -> list[dict]:
    """The first n usable records; A' is the record's generated_output, or else the first half of A
    (a stand-in of realistic length when no generation has been run)."""
    from threeds.data import read_records

    records, _ = read_records(path, duplicate_ids="rename")
    for r in records:
        r.setdefault("generated_output", r["output"][: max(1, len(r["output"]) // 2)])
    return records[:n]


def run_mode(mode: str, data: Path, n: int, max_length: int, batch_tokens: int, model_spec: str | None) -> dict:
    import torch

    from threeds.attention import use_threeds_attention
    from threeds.function_words import FunctionWords
    from threeds.model import load_model
    from threeds.prompts import prompt_format
    from threeds.score import Scorer

    records = bench_records(data, n)
    model, tokenizer = load_model(model_spec, attn_implementation="eager" if mode == "naive" else "sdpa")
    fmt, fw = prompt_format(tokenizer), FunctionWords("lexical")
    fw.flags(["warm up the pipeline"], [[(0, 4)]])
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "naive":
        from naive_score import naive_sample

        rows = [naive_sample(model, tokenizer, fmt, fw, r, max_length) for r in records]
    else:
        use_threeds_attention(model)
        metrics = Scorer(model, tokenizer, fmt, fw, max_length, batch_tokens).score(records).metrics
        rows = metrics.to_dict("records")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(r["gt_tokens"] + r["gen_tokens"] for r in rows)
    return {
        "mode": mode, "seconds": seconds, "cpu_seconds": cpu_seconds, "samples": len(rows), "response_tokens": int(tokens),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": torch.get_num_threads(),
        "metrics": {m: [float(r[m]) for r in rows] for m in METRICS},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="records to score (default 64)")
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--mode", choices=["naive", "threeds"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.data, args.n, args.max_length, args.batch_tokens, args.model)))
        return
    results = {}
    for mode in ("naive", "threeds"):
        cmd = [sys.executable, __file__, "--mode", mode, "--n", str(args.n), "--data", str(args.data),
               "--max-length", str(args.max_length), "--batch-tokens", str(args.batch_tokens)]  # fmt: skip
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    naive, ours = results["naive"], results["threeds"]
    worst = max(
        float(np.nanmax(np.abs(np.array(naive["metrics"][m]) - np.array(ours["metrics"][m])) / np.abs(np.array(naive["metrics"][m]))))
        for m in METRICS
    )
    print(f"samples: {ours['samples']}  response tokens: {ours['response_tokens']}  torch threads: {ours['threads']}")
    print("| path | wall s | CPU s | samples/s (wall) | peak RSS (MiB) |\n|---|---|---|---|---|")
    for r in (naive, ours):
        print(f"| {r['mode']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['samples'] / r['seconds']:.2f} "
              f"| {r['peak_rss_mib']:.0f} |")
    print(f"speed-up: {naive['seconds'] / ours['seconds']:.1f}x wall, {naive['cpu_seconds'] / ours['cpu_seconds']:.1f}x CPU"
          f" time; largest relative difference of any metric: {worst:.2e}")


if __name__ == "__main__":
    main()
