"""`threeds eval` speed on the CPU: the shared prompt pass vs one sequence per choice, in one process
(BENCHMARKS.md (h)).

The same items of a bundled set (`--limit` of them, spread over the subjects), prompts rendered
and tokenized as `threeds eval` does, scored by `threeds.outcomes.loglik.choice_logprobs` in three ways:

  * harness: one sequence `prompt + choice` per choice (the usual lm-eval-harness pattern), batched
    by length like the others;
  * packed: one row per item, the prompt once and every choice after it under a tree mask;
  * threeds (the default): packed, and the start every prompt shares (the chat template's system
    prompt; K-shot examples) computed once, its cache shared by every row.

The model is loaded once (float32, as threeds loads it on a CPU); load time is excluded from these
rows. The items are split into `--rounds` interleaved parts; each part is scored by every path in
turn, the order rotating, and the times are summed, so that on a shared machine every path meets
the same mix of load. Tokens fed = tokens that go through the model. `--end-to-end` also times `evaluate()` as
`threeds eval --limit N` runs it (model load, files) in the same process. Each path's log-probs
are compared with the harness's (largest absolute difference, and whether any prediction changed).

    python bench/eval_speed.py --limit 100 --rounds 5 --out bench/results/eval_speed.md
    python bench/eval_speed.py --work     # tokens each path computes on the whole sets
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threeds.config import EvalConfig, ModelConfig
from threeds.model.decode import shared_prefix
from threeds.model.load import load_model
from threeds.model.prompts import prompt_format
from threeds.outcomes.benchsets import load_bench
from threeds.outcomes.evaluate import (
    _prefix_groups,
    encode,
    evaluate,
    render,
    shots_for,
)
from threeds.outcomes.loglik import MIN_PREFIX, batches, choice_logprobs, pack

PATHS = {"harness": (False, None), "packed": (True, None), "threeds": (True, MIN_PREFIX)}


def requests_for(tokenizer, bench_name: str, limit: int, shots: int, fmt: str):
    bench = load_bench(bench_name, limit)
    chat = prompt_format(tokenizer)
    return [encode(tokenizer, *render(item, fmt, shots_for(item, bench.dev, shots), chat), fmt) for item in bench.items]


def tokens_fed(model, requests, share: bool, min_prefix: int | None, padded: bool = False) -> int:
    """Tokens through the model: the shared start once, then every row (with padding: as batched)."""
    prefix = shared_prefix(model, [r.prompt for r in requests], min_prefix) if min_prefix is not None else None
    start = prefix.length if prefix is not None else 0
    rows = pack(requests, share, start)
    if not padded:
        return start + sum(len(row.ids) for row in rows)
    return start + sum(len(b) * len(rows[b[0]].ids) for b in batches(rows, 32, 8192))


def work_table(model, tokenizer) -> str:
    """Tokens each path computes (padding included) on the whole bundled sets, grouped as
    `threeds eval` groups them (per subject with K-shot examples): no timing, no noise."""
    lines = ["| set | items | harness | packed | threeds | harness / threeds |", "|---|---|---|---|---|---|"]
    for bench, shots in (("mmlu-medical", 0), ("mmlu-medical", 5), ("pubmedqa", 0)):
        items = load_bench(bench).items
        requests = requests_for(tokenizer, bench, None, shots, "chat")
        groups = [[requests[i] for i in g] for g in _prefix_groups(items, shots)]
        with torch.inference_mode():
            fed = {name: sum(tokens_fed(model, g, *PATHS[name], padded=True) for g in groups) for name in PATHS}
        lines.append(f"| {bench}, {shots}-shot, chat | {len(items):,} | {fed['harness']:,} | {fed['packed']:,} | "
                     f"{fed['threeds']:,} | {fed['harness'] / fed['threeds']:.1f}x |")  # fmt: skip
    return "\n".join(lines)


def time_path(model, requests, name: str, batch_size: int, batch_tokens: int) -> dict:
    share, min_prefix = PATHS[name]
    with torch.inference_mode():
        fed = tokens_fed(model, requests, share, min_prefix)
    wall, cpu = time.perf_counter(), time.process_time()
    out = choice_logprobs(model, requests, share=share, min_prefix=min_prefix, batch_size=batch_size,
                          batch_tokens=batch_tokens)  # fmt: skip
    row = {"path": name, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "fed": fed, "logprobs": out}
    print(f"{name}: wall {row['wall']:.1f} s, CPU {row['cpu']:.1f} s, {fed:,} tokens fed, load average "
          f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)  # fmt: skip
    return row


def timed_rounds(model, requests, names: list[str], rounds: int, batch_size: int, batch_tokens: int) -> list[dict]:
    """Every path on every round's items (every `rounds`-th item), the paths' order rotating from one
    round to the next, the times summed: on a shared machine each path meets the same mix of load."""
    totals = {name: {"path": name, "wall": 0.0, "cpu": 0.0, "fed": 0, "logprobs": [None] * len(requests)} for name in names}
    for k in range(rounds):
        part = list(range(k, len(requests), rounds))
        for name in names[k % len(names):] + names[: k % len(names)]:
            row = time_path(model, [requests[i] for i in part], name, batch_size, batch_tokens)
            total = totals[name]
            total["wall"] += row["wall"]
            total["cpu"] += row["cpu"]
            total["fed"] += row["fed"]
            for i, lps in zip(part, row["logprobs"]):
                total["logprobs"][i] = lps
    return [totals[name] for name in names]


def table(rows: list[dict], n: int, header: str) -> str:
    base = next(r for r in rows if r["path"] == "harness")
    lines = [header, "", ("| path | wall s | CPU s | items/s | tokens fed | speed-up vs harness (wall) | (CPU) | "
             "largest abs. diff vs harness | predictions changed |"), "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        diff = max(abs(a - b) for x, y in zip(r["logprobs"], base["logprobs"]) for a, b in zip(x, y))
        changed = sum(_argmax(x) != _argmax(y) for x, y in zip(r["logprobs"], base["logprobs"]))
        lines.append(f"| {r['path']} | {r['wall']:.1f} | {r['cpu']:.1f} | {n / r['wall']:.2f} | {r['fed']:,} | "
                     f"{base['wall'] / r['wall']:.2f}x | {base['cpu'] / r['cpu']:.2f}x | {diff:.1e} | {changed} |")  # fmt: skip
    return "\n".join(lines)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default="mmlu-medical")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--format", default="chat", choices=("chat", "plain"))
    parser.add_argument("--paths", default="threeds,harness,packed", help="comma-separated, in the order run")
    parser.add_argument("--rounds", type=int, default=5, help="items split into this many interleaved rounds")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--end-to-end", action="store_true", help="also time evaluate() as `threeds eval` runs it")
    parser.add_argument("--work", action="store_true", help="only count the tokens each path computes on the whole sets")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    model, tokenizer = load_model()
    if args.work:
        print(work_table(model, tokenizer))
        return
    requests = requests_for(tokenizer, args.bench, args.limit, args.shots, args.format)
    rows = timed_rounds(model, requests, args.paths.split(","), args.rounds, args.batch_size, args.batch_tokens)
    header = (f"{args.bench}, {len(requests)} items (--limit {args.limit}), {args.shots}-shot, {args.format} prompts, "
              f"embedded SmolLM2-135M-Instruct float32, torch threads {torch.get_num_threads()}, load average "
              f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after")  # fmt: skip
    header += f", {args.rounds} interleaved rounds"
    text = table(rows, len(requests), header)
    if args.end_to_end:
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            config = EvalConfig(bench=args.bench, limit=args.limit, shots=args.shots, prompt_format=args.format,
                                batch_size=args.batch_size, batch_tokens=args.batch_tokens)  # fmt: skip
            loaded = load_model(None, config.adapter)  # as `threeds eval` loads the embedded model
            summary = evaluate(*loaded, load_bench(config.bench, config.limit), tmp, config, ModelConfig())
            wall = time.perf_counter() - began
        full = len(load_bench(args.bench).items)
        text += (f"\n\nend to end, `evaluate()` as `threeds eval --bench {args.bench} --limit {args.limit}` runs it "
                 f"(model load and files included): {wall:.1f} s, scoring {summary['seconds']:.1f} s; "
                 f"{full:,} items at this pace: {summary['seconds'] * full / len(requests) / 60:.1f} min of scoring "
                 f"(extrapolated); acc {summary['acc']:.3f}, acc_norm {summary['acc_norm']:.3f}, "
                 f"gold_prob {summary['gold_prob']:.3f}")  # fmt: skip
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
