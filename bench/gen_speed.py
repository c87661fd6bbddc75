"""Generation and rating speed on the CPU, side by side in one process (BENCHMARKS.md (f)).

Generation: the same MedQuAD instructions answered (greedy, `--max-new-tokens`) by
  * plain: the transformers pattern threeds used before, `model.generate` on batches of 8 prompts
    of similar length (left padding), and
  * threeds: `LocalBackend.chat` with its default flags (threeds.model.decode: continuous refill).
Both use the model loaded once, as threeds loads it (float32 on the CPU); load time is excluded.
`--check K` also answers the first K instructions with plain `model.generate` one at a time and
counts the answers of each path that equal those.

Rating (`--rate N`): N records rated (fresh logs) in `--rating-mode generate` with each prompt
prefilled whole (before) and with the rating prompt's common start prefilled once (the default),
and in `--rating-mode logits` with one prompt per batch (`--batch-size 1`) and with the default
batches: the time of each, whether the shared start or the batches changed any score, and the
Spearman rank correlation of the generate and logits scores.

    python bench/gen_speed.py --n 64 --max-new-tokens 128 --check 8 --rate 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threeds.config import RateConfig  # noqa: E402
from threeds.io.data import full_instruction, read_records  # noqa: E402
from threeds.model.backends import LocalBackend, _stop_ids, length_batches  # noqa: E402
from threeds.model.load import load_model  # noqa: E402
from threeds.stages.rate import load_rating_prompt, rate_records  # noqa: E402

DATA = ROOT / "threeds" / "sample_data" / "medquad_en_200.jsonl"


def plain_generate(model, tokenizer, encoded, stop, max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """`model.generate` on length-sorted batches of `batch_size`, left padded; tokens before the first stop."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    out: list[list[int] | None] = [None] * len(encoded)
    for batch in length_batches([len(e) for e in encoded], batch_size):
        rows = [encoded[i] for i in batch]
        width = max(map(len, rows))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.inference_mode():
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:]
        for i, row in zip(batch, generated.tolist()):
            out[i] = row[: next((j for j, t in enumerate(row) if t in stop), len(row))]
    return out  # type: ignore[return-value]


def bench_generation(model, tokenizer, records, args) -> list[str]:
    backend = LocalBackend(model=model, tokenizer=tokenizer)
    prompts = [full_instruction(r) for r in records]
    encoded, end_of_turn = backend.encode(prompts)
    stop = _stop_ids(tokenizer, end_of_turn)
    began = time.perf_counter()
    plain = plain_generate(model, tokenizer, encoded, stop, args.max_new_tokens, 8)
    plain_s = time.perf_counter() - began
    began = time.perf_counter()
    replies = backend.chat(prompts, args.max_new_tokens)
    ours_s = time.perf_counter() - began
    plain_text = [tokenizer.decode(t, skip_special_tokens=True).split(end_of_turn)[0] for t in plain]
    ours_text = [r.text for r in replies]
    tokens = sum(len(t) for t in plain)
    lines = [
        f"{len(records)} instructions, max {args.max_new_tokens} new tokens, {tokens:,} answer tokens (plain path), "
        f"torch threads {torch.get_num_threads()}, load average before {os.getloadavg()[0]:.1f}",
        "", "| path | wall s | answer tokens/s | speed-up |", "|---|---|---|---|",
        f"| plain `model.generate`, batches of 8 | {plain_s:.1f} | {tokens / plain_s:.1f} | 1.00x |",
        f"| threeds (`LocalBackend`, default flags) | {ours_s:.1f} | {tokens / ours_s:.1f} | **{plain_s / ours_s:.2f}x** |",
        "", f"answers equal between the two paths: {sum(a == b for a, b in zip(plain_text, ours_text))} of {len(records)}",
    ]  # fmt: skip
    if args.check:
        alone = plain_generate(model, tokenizer, encoded[: args.check], stop, args.max_new_tokens, 1)
        alone_text = [tokenizer.decode(t, skip_special_tokens=True).split(end_of_turn)[0] for t in alone]
        same = lambda texts: sum(a == b for a, b in zip(alone_text, texts))  # noqa: E731
        lines.append(f"equal to plain `model.generate` one prompt at a time (first {args.check}): "
                     f"threeds {same(ours_text)}, plain batches of 8 {same(plain_text)}")  # fmt: skip
    return lines


def spearman(a: list[float], b: list[float]) -> float:
    import pandas as pd

    return float(pd.Series(a).corr(pd.Series(b), method="spearman"))


def _rate(records, backend, template, mode: str, share: bool) -> tuple[dict, float]:
    """Scores by id and wall seconds of one rating pass into a fresh log; `share=False` prefills each
    prompt whole (no shared start), as threeds did before."""
    from threeds.model import decode

    keep = decode.shared_prefix
    if not share:
        decode.shared_prefix = lambda *a, **k: None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "ratings.jsonl"
            began = time.perf_counter()
            rate_records(records, backend, log, RateConfig(rating_mode=mode), template=template, progress=False)
            seconds = time.perf_counter() - began
            rows = {r["id"]: r["score"] for r in map(json.loads, log.read_text().splitlines())}
    finally:
        decode.shared_prefix = keep
    return rows, seconds


def bench_rating(model, tokenizer, records, args) -> list[str]:
    template = load_rating_prompt("en-medical")
    passes = {("generate", False, 64): "generate, each prompt whole (before)", ("generate", True, 64): "generate (default)",
              ("logits", True, 1): "logits, one prompt per batch (`--batch-size 1`)",
              ("logits", True, 64): "logits (default batches)"}  # fmt: skip
    scores, seconds = {}, {}
    for mode, share, rows in passes:
        backend = LocalBackend(model=model, tokenizer=tokenizer, batch_size=rows)
        scores[mode, share, rows], seconds[mode, share, rows] = _rate(records, backend, template, mode, share)
    base = seconds["generate", False, 64]
    lines = [f"{len(records)} records rated with the en-medical prompt", "",
             "| rating pass | wall s | distinct scores | min | max | speed-up |", "|---|---|---|---|---|---|"]  # fmt: skip
    for key, label in passes.items():
        got = [v for v in scores[key].values() if v is not None]
        lines.append(f"| {label} | {seconds[key]:.1f} | {len(set(got))} | {min(got):g} | {max(got):g} | "
                     f"{base / seconds[key]:.2f}x |")  # fmt: skip
    whole, shared = scores["generate", False, 64], scores["generate", True, 64]
    alone, logits = scores["logits", True, 1], scores["logits", True, 64]
    both = [i for i in whole if whole[i] is not None and logits.get(i) is not None]
    rho = spearman([whole[i] for i in both], [logits[i] for i in both])
    differ = max(abs(alone[i] - logits[i]) for i in logits)
    return lines + [
        "", (f"scores equal with and without the shared start (generate): "
             f"{sum(whole[i] == shared.get(i) for i in whole)} of {len(whole)}"),
        f"logits scores, one prompt per batch vs default batches: largest difference {differ:.4f}",
        f"Spearman rank correlation, generate vs logits (records rated by both: {len(both)}): {rho:.3f}",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="instructions to answer (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--check", type=int, default=0, help="also compare with one prompt at a time on the first K")
    parser.add_argument("--rate", type=int, default=0, help="records to rate in both rating modes (default: 0)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here (markdown)")
    args = parser.parse_args()
    records, _ = read_records(DATA, "rename")
    model, tokenizer = load_model()
    lines = bench_generation(model, tokenizer, records[: args.n], args) if args.n else []
    print("\n".join(lines), flush=True)  # each part as soon as it is measured
    if args.rate:
        rating = [""] + bench_rating(model, tokenizer, records[: args.rate], args)
        print("\n".join(rating), flush=True)
        lines += rating
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
