"""GPU throughput of Stage-2 scoring against the naive path, at Qwen2-1.5B / Qwen2-7B shapes.

    python bench/gpu_score.py --shape 7b                  # a CUDA machine: the issue's targets
    python bench/gpu_score.py --shape tiny --device cpu --samples 8 --naive-samples 2 --chunk-size 4

Speed does not depend on the weights, so each model is built from its published config with random
weights: nothing is downloaded. Samples are drawn with replacement from the bundled MedQuAD sample
(instruction and A from one record, A' = the A of another), so prompt and response lengths follow
its distribution under the embedded tokenizer (prompt median 41 tokens, response median 173, p90
485, 1% over 1024 together); its ids are valid for Qwen2's larger vocabulary.

Three measurements on one model in one process, each after a warm-up:
  gpu path   `Scorer.run_sequences` over pre-tokenised chunks: the forward passes, losses and
             last-layer weights, reduced on the device and copied back (the MFU target applies here)
  end to end `Scorer.score_chunks` over the same chunks, as `threeds score` runs them: the same plus
             tokenising, function words and token rows on the host, in two threads beside the model
  naive      the original release's method (`bench/naive_score.py`): one sample at a time, three
             passes, eager attention in every layer with all attention maps returned
MFU = 2 x (parameters of all matmul weights, lm_head included, input embedding excluded) x forward
tokens per second / the GPU's dense bf16 peak; attention FLOPs are left out (< 1% at these lengths).
Forward tokens are the tokens each path feeds the model: the naive path's prompt-only pass counts.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from naive_score import naive_sample
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config

from threeds.config import ModelConfig, ScoreConfig
from threeds.io.data import full_instruction, read_records
from threeds.model.load import load_tokenizer
from threeds.stages.score import RESPONSES, Scorer, build_scorer, launch_batch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "threeds" / "sample_data" / "medquad_en_200.jsonl"

# Published Qwen2 configs (hub: Qwen/Qwen2-1.5B, Qwen/Qwen2-7B). tiny is for CPU smoke tests; its
# vocabulary is the embedded tokenizer's, as the logits would otherwise dominate its cost.
SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 49152, "tie_word_embeddings": True},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
}  # fmt: skip
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity), matched in order against the device name.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]


def build_model(shape: str, device: torch.device) -> PreTrainedModel:
    """A random-weight Qwen2 of the given shape, created on `device` (bf16 on CUDA, float32 on CPU)."""
    config = Qwen2Config(**SHAPES[shape], rms_norm_eps=1e-6, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})  # fmt: skip
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def matmul_parameters(model: PreTrainedModel) -> int:
    """Weights that do 2 FLOPs per token each: every Linear, lm_head included (tied or not)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "cpu: no peak"
    name = torch.cuda.get_device_name(device)
    return next(((tflops, name) for key, tflops in PEAK_TFLOPS if key in name), (None, f"{name}: unknown peak"))


def sample_records(n: int, seed: int) -> list[dict]:
    """n samples drawn with replacement from the sample data; A' is another record's A."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sample's two duplicate ids, renamed
        rows, _ = read_records(SAMPLE, duplicate_ids="rename")
    rng = random.Random(seed)
    return [
        {**rows[rng.randrange(len(rows))], "id": f"s{k}", "generated_output": rows[rng.randrange(len(rows))]["output"]}
        for k in range(n)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, work: Callable[[], None]) -> tuple[float, float | None]:
    """(seconds, peak GPU memory in GiB) of `work`; no memory figure on CPU."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    work()
    sync(device)
    seconds = time.perf_counter() - started
    return seconds, (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)


def host_syncs_in_one_launch(scorer: Scorer, sequences: list) -> int | None:
    """Synchronising CUDA calls made while queueing one batch (torch's sync debug mode)."""
    if scorer.model.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pending = launch_batch(scorer.model, sequences, scorer.pad_id)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    pending.outputs()
    return sum("synchroniz" in str(w.message) for w in caught)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(args.shape, device)
    tokenizer = load_tokenizer()
    score = ScoreConfig(max_length=args.max_length, function_words=args.function_words, batch_tokens=args.batch_tokens)
    scorer = build_scorer(model, tokenizer, score, ModelConfig())
    records = sample_records(args.samples, args.seed)
    chunks = [records[i : i + args.chunk_size] for i in range(0, len(records), args.chunk_size)]
    encoded = [[enc[name] for r in chunk for enc in [scorer.encode_record(r)] for name in RESPONSES] for chunk in chunks]
    forward_tokens = sum(len(e.ids) for seqs in encoded for e in seqs)
    scorer.score(records[:4])  # warm-up: kernels, allocator, function-word pipeline
    syncs = host_syncs_in_one_launch(scorer, encoded[0][:8])
    results = {}

    seconds, memory = measure(device, lambda: [scorer.run_sequences(seqs) for seqs in encoded])
    results["gpu path"] = (len(records), forward_tokens, seconds, memory)
    seconds, memory = measure(device, lambda: list(scorer.score_chunks(chunks)))
    results["end to end"] = (len(records), forward_tokens, seconds, memory)

    naive = records[: args.naive_samples]
    model.set_attn_implementation("eager")
    naive_sample(model, tokenizer, scorer.fmt, scorer.fw, naive[0], args.max_length)  # warm-up
    prompts = [scorer.fmt.prompt(full_instruction(r)) for r in naive]
    naive_tokens = sum(min(len(tokenizer(p, add_special_tokens=False)["input_ids"]), args.max_length) for p in prompts)
    naive_tokens += sum(len(e.ids) for e in [enc for seqs in encoded for enc in seqs][: 2 * len(naive)])
    seconds, memory = measure(device, lambda: [naive_sample(model, tokenizer, scorer.fmt, scorer.fw, r, args.max_length) for r in naive])
    results["naive"] = (len(naive), naive_tokens, seconds, memory)

    peak, peak_source = peak_tflops(device, args.peak_tflops)
    params = matmul_parameters(model)
    rows = []
    for path, (samples, tokens, seconds, memory) in results.items():
        rate = tokens / seconds
        rows.append({
            "path": path, "samples": samples, "forward_tokens": tokens, "seconds": seconds,
            "samples_per_s": samples / seconds, "tokens_per_s": rate,
            "mfu": 2 * params * rate / (peak * 1e12) if peak else None, "peak_gpu_gib": memory,
        })  # fmt: skip
    by_path = {r["path"]: r for r in rows}
    return {
        "shape": args.shape, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_tflops": peak, "peak_source": peak_source, "matmul_parameters": params,
        "max_length": args.max_length, "batch_tokens": args.batch_tokens, "chunk_size": args.chunk_size,
        "function_words": scorer.fw.describe(), "torch_threads": torch.get_num_threads(),
        "host_syncs_per_launch": syncs, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__, "rows": rows,
        "speedup_gpu_path": by_path["gpu path"]["samples_per_s"] / by_path["naive"]["samples_per_s"],
        "speedup_end_to_end": by_path["end to end"]["samples_per_s"] / by_path["naive"]["samples_per_s"],
    }  # fmt: skip


def report(result: dict) -> str:
    """Markdown: settings, one row per path, speed-ups."""
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        f"shape {result['shape']} ({result['matmul_parameters'] / 1e9:.2f}B matmul parameters) on "
        f"{result['device_name']}; peak {fmt(result['peak_tflops'], '.1f')} TFLOP/s ({result['peak_source']}); "
        f"max_length {result['max_length']}, batch_tokens {result['batch_tokens']}, chunk {result['chunk_size']}, "
        f"function words {result['function_words']}, torch {result['torch']}, {result['torch_threads']} threads; "
        f"host syncs while queueing one batch: {fmt(result['host_syncs_per_launch'], 'd')}",
        "",
        "| path | samples | forward tokens | seconds | samples/s | tokens/s | MFU | peak GPU memory (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['path']} | {r['samples']} | {r['forward_tokens']:,} | {r['seconds']:.2f} | {r['samples_per_s']:.2f} "
            f"| {r['tokens_per_s']:,.0f} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} "
            f"| {fmt(r['peak_gpu_gib'], '.1f')} |"
        )
    lines += ["", f"speed-up over naive (samples/s): gpu path {result['speedup_gpu_path']:.1f}x, "
                  f"end to end {result['speedup_end_to_end']:.1f}x"]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="7b")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--samples", type=int, default=1024, help="samples for the gpu-path and end-to-end runs")
    parser.add_argument("--naive-samples", type=int, default=32, help="samples for the naive run (one at a time)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--chunk-size", type=int, default=256, help="samples per Scorer call, as in `threeds score`")
    parser.add_argument("--function-words", default="auto", choices=["auto", "pos", "lexical", "none"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for GPUs not in the table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
