"""The function-word filter: threeds's (character-offset spans) against the authors' (token strings
matched against a word list), and what each does to the selection (issue 23, docs/SPEC-3DS.md).

The authors compare each model token's string with a list of function words. On a byte-level BPE
tokenizer a word after a space is a token like "Ġthe", so on English almost only punctuation
matches. threeds marks the tokens that lie inside function-word character spans. Here both run on
the same responses, with the same word list: for "authors", the surface forms of the words that
threeds's own filter marks in those responses (lexical: spaCy's blank pipeline, stop words and
punctuation; pos: the Chinese POS filter, jieba.posseg mapped to UD classes), matched exactly
against `tokenizer.convert_ids_to_tokens`. `punct` is threeds's span matching limited to
punctuation (`--function-words punct`). English POS needs a trained spaCy pipeline (en_core_web_sm), which is not installed
here, so it is left out.

Losses and attention weights do not depend on the filter, so every token is scored once and each
filter only changes which tokens the weighted losses keep; the selection is then redone with the
run's bands and sample_num (percentile bands, then k-center greedy on the embeddings).

- English: the shipped demo run (cache/demo: 40 MedQuAD records, A' and per-token rows there).
- Chinese: the first --zh-records of threeds/sample_data/cmdd_zh_200.jsonl, A' generated here
  (greedy, --max-new-tokens) and scored here, both with the embedded SmolLM2-135M-Instruct.

    python bench/filter_compare.py                  # writes bench/results/filter_compare.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from threeds.io.data import read_jsonl  # noqa: E402
from threeds.model.function_words import FunctionWords, FunctionWordsError  # noqa: E402
from threeds.model.load import load_model  # noqa: E402
from threeds.model.prompts import prompt_format  # noqa: E402
from threeds.names import METRICS  # noqa: E402
from threeds.selection.kcenter import band_filter, k_center_greedy  # noqa: E402

RESPONSES = {"gt": "output", "gen": "generated_output"}


def score_chinese(n: int, max_new_tokens: int) -> tuple[list[dict], pd.DataFrame, pd.DataFrame, np.ndarray]:
    """A' and every Stage-2 number for the first n Chinese sample records (no filter)."""
    from threeds.model.backends import LocalBackend
    from threeds.stages.generate import generate_records
    from threeds.stages.score import build_scorer
    from threeds.config import ModelConfig, ScoreConfig

    records = read_jsonl(ROOT / "threeds/sample_data/cmdd_zh_200.jsonl")[:n]
    model, tokenizer = load_model(None)
    with tempfile.TemporaryDirectory() as tmp:
        backend = LocalBackend(None, model=model, tokenizer=tokenizer, batch_size=n)
        records, _ = generate_records(records, backend, Path(tmp) / "gen.jsonl", max_new_tokens, progress=False)
    scorer = build_scorer(model, tokenizer, ScoreConfig(function_words="none"), ModelConfig())
    result = scorer.score(records)
    return records, result.metrics, result.tokens, result.embeddings


def demo_run() -> tuple[list[dict], pd.DataFrame, pd.DataFrame, np.ndarray, dict]:
    run = ROOT / "cache/demo"
    select = json.loads((run / "manifest.json").read_text())["stages"]["select"]["config"]
    return (read_jsonl(run / "data.jsonl"), pd.read_parquet(run / "metrics.parquet"), pd.read_parquet(run / "tokens.parquet"),
            np.load(run / "embeddings.npy"), select)  # fmt: skip


def token_strings(tokenizer, eot: str, records: list[dict], tokens: pd.DataFrame) -> list[list[str]]:
    """The tokenizer's own token strings of each (record, response) `R + E`, checked against the
    run's token rows (same spans), in the rows' order."""
    out = []
    for (sample_id, response), rows in tokens.groupby(["id", "response"], sort=False):
        record = next(r for r in records if r["id"] == sample_id)
        enc = tokenizer(record[RESPONSES[response]] + eot, add_special_tokens=False, return_offsets_mapping=True)
        n = len(rows)
        assert [tuple(o) for o in enc["offset_mapping"][:n]] == list(zip(rows.start, rows.end)), (sample_id, response)
        out.append(tokenizer.convert_ids_to_tokens(enc["input_ids"][:n]))
    return out


def span_flags(fw: FunctionWords, records: list[dict], tokens: pd.DataFrame) -> tuple[list[np.ndarray], set[str]]:
    """threeds's flags per (record, response), and the surface forms of the words it marks."""
    by_id = {r["id"]: r for r in records}
    texts, offsets = [], []
    for (sample_id, response), rows in tokens.groupby(["id", "response"], sort=False):
        texts.append(by_id[sample_id][RESPONSES[response]])
        offsets.append(list(zip(rows.start, rows.end)))
    words = {text[s:e] for text in texts for s, e in fw.spans(text)}
    return [np.asarray(f, dtype=bool) for f in fw.flags(texts, offsets)], words


def selection(metrics: pd.DataFrame, tokens: pd.DataFrame, flags: list[np.ndarray], embeddings: np.ndarray,
              config: dict) -> tuple[set[str], set[str]]:  # fmt: skip
    """(band survivors, picks) with the weighted losses recomputed keeping the unflagged tokens."""
    metrics = metrics.copy()
    for ((sample_id, response), rows), flag in zip(tokens.groupby(["id", "response"], sort=False), flags):
        keep = ~flag
        loss = rows.loss.to_numpy()[keep]
        for method in ("mean", "max"):
            w = rows[f"w_{method}"].to_numpy()[keep]
            value = float((loss * w).sum() / w.sum()) if w.size and w.sum() > 0 else np.nan
            metrics.loc[metrics.id == sample_id, f"{response}_wloss_{method}"] = value
    bands = {m: tuple(config["bands"][m]) for m in METRICS}
    keep, _ = band_filter(metrics, bands, config["atten_method"])
    rows = np.flatnonzero(keep)
    picks = rows[k_center_greedy(embeddings[rows], config["sample_num"], seed=config["seed"], device="cpu")]
    ids = metrics.id.to_numpy()
    return set(ids[rows]), set(ids[picks])


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def compare(name: str, lang: str, records, metrics, tokens, embeddings, config, tokenizer, eot) -> list[str]:
    """One language's table: share of response tokens dropped by each filter, and the selections."""
    in_text = [(rows.end.to_numpy() <= len(next(r for r in records if r["id"] == i)[RESPONSES[resp]]))
               for (i, resp), rows in tokens.groupby(["id", "response"], sort=False)]  # fmt: skip
    strings = token_strings(tokenizer, eot, records, tokens)
    flags = {"none": [np.zeros(len(s), dtype=bool) for s in strings]}
    lists = {}
    for mode in ("lexical", "pos", "punct"):
        try:
            flags[mode], lists[mode] = span_flags(FunctionWords(mode, lang), records, tokens)
        except FunctionWordsError:
            pass  # English POS: no trained spaCy pipeline installed
    del lists["punct"]
    for mode, words in lists.items():
        flags[f"authors ({mode} list)"] = [np.array([t in words for t in s], dtype=bool) for s in strings]
    shares = {mode: sum(int((f & t).sum()) for f, t in zip(fl, in_text)) / sum(int(t.sum()) for t in in_text)
              for mode, fl in flags.items()}  # fmt: skip
    chosen = {mode: selection(metrics, tokens, fl, embeddings, config) for mode, fl in flags.items()}
    lines = [f"### {name}", "", f"{len(records)} records, {sum(int(t.sum()) for t in in_text)} response tokens (A and A'), "
             f"bands {config['bands']['ins_ppl']} on each metric ({config['atten_method']}), sample_num {config['sample_num']}.", "",
             "| filter | response tokens dropped | band survivors | picks |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {m} | {shares[m]:.1%} | {len(chosen[m][0])} | {len(chosen[m][1])} |" for m in flags]
    lines += ["", "Jaccard of the picks (band survivors in brackets):", "", "| | " + " | ".join(flags) + " |",
              "|---" * (len(flags) + 1) + "|"]  # fmt: skip
    for a in flags:
        cells = [f"{jaccard(chosen[a][1], chosen[b][1]):.2f} ({jaccard(chosen[a][0], chosen[b][0]):.2f})" for b in flags]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    matched = sorted({t for s, f in zip(strings, flags.get("authors (lexical list)", [])) for t, x in zip(s, f) if x})
    return [*lines, "", f"Token strings the authors' match drops (lexical list): {' '.join(matched[:40])}", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zh-records", type=int, default=24, help="0: English only")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/filter_compare.md")
    args = parser.parse_args()
    started = time.perf_counter()
    from threeds.model.load import load_tokenizer

    tokenizer = load_tokenizer()
    eot = prompt_format(tokenizer).end_of_turn
    records, metrics, tokens, embeddings, config = demo_run()
    lines = ["# Function-word filter: threeds against the authors' token-string match", "",
             f"`python bench/filter_compare.py --zh-records {args.zh_records} --max-new-tokens {args.max_new_tokens}`",
             "(embedded SmolLM2-135M-Instruct and its byte-level BPE tokenizer).", ""]  # fmt: skip
    lines += compare("English: the demo run (cache/demo)", "en", records, metrics, tokens, embeddings, config, tokenizer, eot)
    print("\n".join(lines), flush=True)  # the Chinese part needs the model: minutes on a busy CPU
    if args.zh_records:
        zh = score_chinese(args.zh_records, args.max_new_tokens)
        zh_config = {**config, "sample_num": max(1, args.zh_records // 4)}
        part = compare(f"Chinese: the first {args.zh_records} records of cmdd_zh_200", "zh", *zh, zh_config, tokenizer, eot)
        print("\n".join(part), flush=True)
        lines += part
    lines.append(f"({time.perf_counter() - started:.0f} s on a shared 2-core machine)")
    args.out.write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
