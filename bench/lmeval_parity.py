"""Parity of `threeds eval` with lm-evaluation-harness, measured (BENCHMARKS.md (p), issue 31 item 6).

threeds scores MMLU-medical items (`--limit` of them, spread over the six subjects) with the embedded
SmolLM2-135M-Instruct in each prompt format; every (context, continuation) pair it scored, with its
token ids and log-likelihood, is then given to the harness's own Hugging Face model class
(`lm_eval.models.huggingface.HFLM`, float32 on the CPU, the same converted model folder), run by the
Python of a separate environment that has `lm-eval` installed (it pins other packages than threeds):

  * strings: `HFLM.loglikelihood` on the (context, continuation) text pairs, the harness's public
    path: it tokenizes them itself (moving trailing whitespace of the context into the continuation);
  * tokens: `HFLM._loglikelihood_tokens` on the very token ids threeds scored.

Per format: the largest |threeds - harness| log-likelihood over all choices, and acc / acc_norm
computed from each side's numbers (acc_norm: log-likelihood per character of the choice as the
harness counts it, the continuation without its leading space), and how many predictions differ.

    python3 -m venv /work/lmeval-venv && /work/lmeval-venv/bin/pip install torch==2.13.0 && \\
        /work/lmeval-venv/bin/pip install lm-eval transformers==5.23.0
    .venv/bin/python bench/lmeval_parity.py --limit 60 --lmeval-python /work/lmeval-venv/bin/python \\
        --out bench/results/lmeval_parity.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("chat", "plain", "letters")


# ------------------------------------------------------------------------------ the harness side (its own venv)


def harness(pairs_path: Path, model_dir: str, out_path: Path, batch_size: int) -> None:
    """Score every pair with lm-eval's HFLM, from text and from threeds' token ids; writes out_path."""
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    pairs = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    lm = HFLM(pretrained=model_dir, device="cpu", dtype="float32", batch_size=batch_size)
    began = time.perf_counter()
    text = lm.loglikelihood([Instance("loglikelihood", {}, (p["context"], p["continuation"]), i) for i, p in enumerate(pairs)],
                            disable_tqdm=True)  # fmt: skip
    tokens = lm._loglikelihood_tokens([((p["context"], p["continuation"]), p["context_ids"], p["continuation_ids"]) for p in pairs],
                                      disable_tqdm=True)  # fmt: skip
    out_path.write_text(json.dumps({"strings": [lp for lp, _ in text], "tokens": [lp for lp, _ in tokens],
                                    "seconds": time.perf_counter() - began, "lm_eval": lm_eval.__version__}))  # fmt: skip


# ------------------------------------------------------------------------------ the threeds side


def threeds_pairs(limit: int, shots: int, formats: list[str], work: Path) -> tuple[list[dict], str]:
    """Every scored (context, continuation) of every format, with threeds' token ids and log-likelihood."""
    sys.path.insert(0, str(ROOT))
    from threeds.config import EvalConfig, ModelConfig
    from threeds.io.data import read_jsonl
    from threeds.model.load import load_model, resolve_model
    from threeds.outcomes.benchsets import load_bench
    from threeds.outcomes.evaluate import encode, evaluate

    model, tokenizer = load_model(None, dtype="float32")
    bench = load_bench("mmlu-medical", limit)
    pairs = []
    for fmt in formats:
        evaluate(model, tokenizer, bench, work / fmt, EvalConfig(prompt_format=fmt, shots=shots), ModelConfig(), overwrite=True)
        for row in read_jsonl(work / fmt / "items.jsonl"):
            request = encode(tokenizer, row["prompt"], row["choices"], fmt)
            for j, cont in enumerate(row["choices"]):
                pairs.append({"format": fmt, "id": row["id"], "gold": row["gold"], "choice": j, "context": row["prompt"],
                              "continuation": cont, "context_ids": request.prompt, "continuation_ids": request.choices[j],
                              "threeds": row["logprobs"][j]})  # fmt: skip
    return pairs, resolve_model(None)


def predictions(pairs: list[dict], values: list[float]) -> dict[str, tuple[int, int]]:
    """Per item: (argmax log-likelihood, argmax per character of the choice as the harness counts it)."""
    items: dict[str, list[tuple[float, float]]] = {}
    for pair, value in zip(pairs, values, strict=True):
        chars = max(1, len(pair["continuation"].removeprefix(" ")))
        items.setdefault(pair["id"], []).append((value, value / chars))
    return {i: (max(range(len(v)), key=lambda j: v[j][0]), max(range(len(v)), key=lambda j: v[j][1])) for i, v in items.items()}


def compare(pairs: list[dict], harness_out: dict) -> list[dict]:
    rows = []
    for fmt in dict.fromkeys(p["format"] for p in pairs):
        pick = [k for k, p in enumerate(pairs) if p["format"] == fmt]
        part = [pairs[k] for k in pick]
        golds = {p["id"]: p["gold"] for p in part}
        ours = predictions(part, [p["threeds"] for p in part])
        row = {"format": fmt, "items": len(golds), "choices": len(part),
               "threeds acc": sum(ours[i][0] == g for i, g in golds.items()) / len(golds),
               "threeds acc_norm": sum(ours[i][1] == g for i, g in golds.items()) / len(golds)}  # fmt: skip
        for path in ("tokens", "strings"):
            theirs_lp = [harness_out[path][k] for k in pick]
            theirs = predictions(part, theirs_lp)
            row[f"{path}: max |dlogL|"] = max(abs(p["threeds"] - v) for p, v in zip(part, theirs_lp, strict=True))
            row[f"{path}: acc"] = sum(theirs[i][0] == g for i, g in golds.items()) / len(golds)
            row[f"{path}: acc_norm"] = sum(theirs[i][1] == g for i, g in golds.items()) / len(golds)
            row[f"{path}: preds differ"] = sum(ours[i][0] != theirs[i][0] for i in golds)
            row[f"{path}: norm preds differ"] = sum(ours[i][1] != theirs[i][1] for i in golds)
        rows.append(row)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, harness_out: dict) -> str:
    head = ["format", "items", "path", "max abs dlogL", "acc threeds / harness", "acc_norm threeds / harness",
            "predictions differ (acc, acc_norm)"]  # fmt: skip
    lines = [f"lm-eval {harness_out['lm_eval']}, {args.limit} MMLU-medical items, {args.shots}-shot, embedded SmolLM2-135M-Instruct "
             "(float32, CPU)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in rows:
        for path in ("tokens", "strings"):
            lines.append(f"| {r['format']} | {r['items']} | {path} | {r[f'{path}: max |dlogL|']:.2e} | "
                         f"{r['threeds acc']:.3f} / {r[f'{path}: acc']:.3f} | {r['threeds acc_norm']:.3f} / {r[f'{path}: acc_norm']:.3f} | "
                         f"{r[f'{path}: preds differ']}, {r[f'{path}: norm preds differ']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "harness":
        harness(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=60, help="MMLU-medical items, spread over the subjects")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--lmeval-python", required=True, help="the Python of an environment with lm-eval installed")
    parser.add_argument("--batch-size", type=int, default=8, help="the harness's batch size")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--work", type=Path, help="keep the pairs and the harness's numbers here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pairs, model_dir = threeds_pairs(args.limit, args.shots, args.formats, work)
        (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        subprocess.run([args.lmeval_python, __file__, "harness", str(work / "pairs.jsonl"), str(Path(model_dir).resolve()),
                        str(work / "harness.json"), str(args.batch_size)], check=True)  # fmt: skip
        harness_out = json.loads((work / "harness.json").read_text())
    rows = compare(pairs, harness_out)
    text = markdown(rows, args, harness_out)
    print(text)
    print(json.dumps(rows, indent=1))
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
