"""Benchmark (a) of BENCHMARKS.md: `threeds` Stage-2 scoring against the naive baseline.

Both paths score the same records with the same model; each runs in its own subprocess so that
peak memory (ru_maxrss) is its own. Model loading is excluded from both times.

Each path's arithmetic rate is model FLOPs (2 x parameters x tokens fed, the MFU convention; the
tied embedding counts once, as the output head) over wall time, set against this machine's
matrix-multiply peak measured in the same run at the model's own shapes. That bounds any speed-up:
a path at 100% of the peak, with the FLOPs threeds must do, is at most `bound` times faster than
the measured naive path.

    python bench/score_speed.py --n 64                      # embedded model, sample data
    python bench/score_speed.py --n 64 --bf16               # also threeds in bfloat16 (opt-in on CPU)
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
    from threeds.io.data import read_records

    records, _ = read_records(path, duplicate_ids="rename")
    for r in records:
        r.setdefault("generated_output", r["output"][: max(1, len(r["output"]) // 2)])
    return records[:n]


def tokens_fed(mode: str, tokenizer, fmt, records: list[dict], rows: list[dict], max_length: int) -> int:
    """Tokens through the model: naive = prompt + (prompt + A) + (prompt + A'); threeds = the two
    long passes (padding excluded). End-of-turn markers counted as response tokens (+/- 1)."""
    from threeds.io.data import full_instruction

    total = 0
    for record, row in zip(records, rows):
        prompt = len(tokenizer(fmt.prompt(full_instruction(record)), add_special_tokens=False)["input_ids"])
        total += sum(min(max_length, prompt + row[f"{r}_tokens"]) for r in ("gt", "gen"))
        total += min(max_length, prompt) if mode == "naive" else 0
    return total


def matmul_peak_gflops(hidden: int, inner: int, dtype, repeats: int = 8) -> float:
    """Best rate of `repeats` matrix products at the MLP's shape and at a large square one."""
    import torch

    best = 0.0
    for m, k, n in ((4096, hidden, inner), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)
        seconds = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
        best = max(best, 2 * m * k * n / seconds / 1e9)
    return best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_mode(mode: str, data: Path, n: int, max_length: int, batch_tokens: int, model_spec: str | None) -> dict:
    import torch

    from threeds.model.attention import use_threeds_attention
    from threeds.model.function_words import FunctionWords
    from threeds.model.load import load_model
    from threeds.model.prompts import prompt_format
    from threeds.stages.score import Scorer

    records = bench_records(data, n)
    dtype = torch.bfloat16 if mode == "threeds-bf16" else torch.float32
    attention = "eager" if mode == "naive" else "sdpa"
    model, tokenizer = load_model(model_spec, device="cpu", dtype=dtype, attn_implementation=attention)
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
    fed = tokens_fed("naive" if mode == "naive" else "threeds", tokenizer, fmt, records, rows, max_length)
    params = sum(p.numel() for p in model.parameters())  # tied embedding: counted once
    config = model.config
    return {
        "mode": mode, "seconds": seconds, "cpu_seconds": cpu_seconds, "samples": len(rows), "response_tokens": int(tokens),
        "tokens_fed": fed, "gflop": 2 * params * fed / 1e9,
        "peak_gflops": matmul_peak_gflops(config.hidden_size, config.intermediate_size, dtype),
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
    parser.add_argument("--bf16", action="store_true", help="also time threeds with the model in bfloat16")
    parser.add_argument("--mode", choices=["naive", "threeds", "threeds-bf16"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.data, args.n, args.max_length, args.batch_tokens, args.model)))
        return
    results = {}
    for mode in ("naive", "threeds") + (("threeds-bf16",) if args.bf16 else ()):
        cmd = [sys.executable, __file__, "--mode", mode, "--n", str(args.n), "--data", str(args.data),
               "--max-length", str(args.max_length), "--batch-tokens", str(args.batch_tokens)]  # fmt: skip
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    print(report(results))


def _worst_difference(a: dict, b: dict) -> float:
    """Largest relative difference of any metric of any sample between two paths."""
    return max(
        float(np.nanmax(np.abs(np.array(a["metrics"][m]) - np.array(b["metrics"][m])) / np.abs(np.array(a["metrics"][m]))))
        for m in METRICS
    )


def report(results: dict) -> str:
    naive, ours = results["naive"], results["threeds"]
    lines = [
        f"samples: {ours['samples']}  response tokens: {ours['response_tokens']}  torch threads: {ours['threads']}",
        "| path | wall s | CPU s | samples/s (wall) | tokens fed | GFLOP | GFLOP/s | matmul peak GFLOP/s | share of peak "
        "| peak RSS (MiB) | speed-up (wall) | largest rel. diff vs naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        rate = r["gflop"] / r["seconds"]
        lines.append(
            f"| {r['mode']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['samples'] / r['seconds']:.2f} "
            f"| {r['tokens_fed']:,} | {r['gflop']:,.0f} | {rate:.0f} | {r['peak_gflops']:.0f} "
            f"| {rate / r['peak_gflops']:.0%} | {r['peak_rss_mib']:.0f} | {naive['seconds'] / r['seconds']:.2f}x "
            f"| {_worst_difference(naive, r):.1e} |"
        )
    bound = naive["seconds"] / (ours["gflop"] / ours["peak_gflops"])
    lines.append(
        f"bound: the FLOPs threeds must do, at 100% of the float32 matmul peak, take {ours['gflop'] / ours['peak_gflops']:.1f} s: "
        f"at most {bound:.1f}x faster than the naive path's {naive['seconds']:.1f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
