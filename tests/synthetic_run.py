"""Build run directories exactly as docs/DESIGN.md lays them out, from synthetic numbers.

Used by the app tests (tiny runs) and bench/app_responsiveness.py (100k samples), so neither
needs a model. `n_dropped` extra records are rated below the threshold and never scored, as a
real Stage 1 would leave them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

SOURCES = ("medqa", "pubmed", "forum")
FUNCTION_WORDS = {"the", "a", "of", "and", "to", "in", "is", ".", ","}
EOT = "<|im_end|>"


def make_records(n: int, n_dropped: int, rng: np.random.Generator) -> list[dict]:
    topics = ["fever", "cough", "diabetes", "asthma", "migraine", "anemia", "sepsis", "gout"]
    records = []
    for i in range(n + n_dropped):
        topic = topics[i % len(topics)]
        records.append(
            {
                "id": f"s{i:06d}" if i < n else f"d{i - n:06d}",
                "instruction": f"What is the treatment of {topic} in case {i}?",
                "output": f"The treatment of {topic} depends on the cause. Rest and fluids help in case {i}.",
                "generated_output": f"For {topic}, see a doctor and rest.",
                "source": SOURCES[i % len(SOURCES)],
            }
        )
    return records


def token_rows(sample_id: str, response: str, text: str, rng: np.random.Generator) -> list[tuple]:
    rows = []
    spans = [(m.start(), m.end()) for m in re.finditer(r"\s?\w+|\s?[^\w\s]", text)] + [(len(text), len(text) + len(EOT))]
    for pos, (s, e) in enumerate(spans):
        token = EOT if s >= len(text) else text[s:e]
        rows.append(
            (sample_id, response, pos, token, s, e, float(rng.gamma(2.0)), float(rng.random()), float(rng.random()), token.strip().lower() in FUNCTION_WORDS)
        )
    return rows


def make_run(
    path: Path,
    n: int = 40,
    n_dropped: int = 10,
    dim: int = 16,
    seed: int = 0,
    stages: tuple[str, ...] = ("rate", "score"),
    tokens: bool = True,
    nan_rows: int = 2,
) -> Path:
    """A run directory with Stage 1 (`rate`) and/or Stage 2 (`score`) files; returns `path`."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    records = make_records(n, n_dropped, rng)
    input_file = path / "input.jsonl"
    input_file.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "generated_output"}) + "\n" for r in records))
    bands = {m: [25.0, 75.0] for m in ("ins_ppl", "gen_wloss", "gt_wloss")}
    manifest = {  # the shape `threeds run` writes, trimmed to what the app reads
        "stages": {
            "rate": {"data": {"path": str(input_file), "fingerprint": "synthetic", "n_records": n + n_dropped}},
            "filter": {"config": {"quality_threshold": 85.0}},
            "generate": {"summary": {"done": n}},
            "select": {"config": {"bands": bands, "sample_num": 5000, "atten_method": "mean", "seed": 0}},
        },
        "model": {"spec": None, "name_or_path": "synthetic"},
        "data": {"path": str(input_file), "fingerprint": "synthetic", "n_records": n},
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (path / "rejects.jsonl").write_text(json.dumps({"index": 0, "id": None, "field": "output", "reason": "empty"}) + "\n")
    if "rate" in stages:
        scores = np.concatenate([rng.uniform(85, 100, n), rng.uniform(0, 85, n_dropped)]).round(1)
        ratings = [
            {"id": r["id"], "score": float(s), "raw": str(s), "backend": "local", "model": "synthetic", "seconds": 0.1, "error": None}
            for r, s in zip(records, scores)
        ]
        ratings[-1] |= {"score": None, "error": "no number in the reply"}
        (path / "ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ratings))
    if "score" in stages:
        write_scores(path, records[:n], dim, rng, tokens, nan_rows)
    return path


def write_scores(path: Path, records: list[dict], dim: int, rng: np.random.Generator, tokens: bool, nan_rows: int) -> None:
    n = len(records)
    metrics = pd.DataFrame(
        {
            "id": [r["id"] for r in records],
            "ins_ppl": rng.lognormal(2.0, 0.6, n),
            "gt_wloss_mean": rng.gamma(3.0, 0.5, n),
            "gt_wloss_max": rng.gamma(3.0, 0.6, n),
            "gen_wloss_mean": rng.gamma(2.0, 0.4, n),
            "gen_wloss_max": rng.gamma(2.0, 0.5, n),
            "prompt_tokens": rng.integers(10, 60, n),
            "gt_tokens": rng.integers(5, 300, n),
            "gen_tokens": rng.integers(5, 300, n),
            "gt_kept_tokens": rng.integers(3, 200, n),
            "gen_kept_tokens": rng.integers(3, 200, n),
            "truncated": np.zeros(n, bool),
        }
    )
    metrics.loc[: nan_rows - 1, "gen_wloss_mean"] = np.nan
    metrics.loc[: nan_rows - 1, "gen_wloss_max"] = np.nan
    metrics.to_parquet(path / "metrics.parquet", index=False)
    centres = rng.normal(0, 4, (8, dim))
    emb = centres[rng.integers(0, 8, n)] + rng.normal(0, 1, (n, dim))
    np.save(path / "embeddings.npy", emb.astype(np.float32))
    with open(path / "data.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    if tokens:
        rows = [row for r in records for resp, field in (("gt", "output"), ("gen", "generated_output")) for row in token_rows(r["id"], resp, r[field], rng)]
        columns = ["id", "response", "pos", "token", "start", "end", "loss", "w_mean", "w_max", "function_word"]
        pd.DataFrame(rows, columns=columns).to_parquet(path / "tokens.parquet", index=False)


LOOP = "Rest and fluids help. " * 6  # repeats itself: every word token covered (threeds.selection.answer_flags)


def flag_answers(path: Path, cap: int = 400, hit: tuple[int, ...] = (2, 5), loop: tuple[int, ...] = (3, 7),
                 blank: tuple[int, ...] = (9,)) -> dict[str, list[str]]:  # fmt: skip
    """Give some scored samples of a synthetic run a flagged A': rows `hit` reach the generation cap
    `cap` (recorded in the manifest as `threeds run` does), rows `loop` repeat themselves, rows
    `blank` are invisible characters only. Returns the ids per flag."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["stages"]["generate"]["config"] = {"backend": "local", "max_new_tokens": cap}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    metrics = pd.read_parquet(path / "metrics.parquet")
    metrics.loc[list(hit), "gen_tokens"] = cap + 1  # A' tokens + the end-of-turn marker's one
    metrics.to_parquet(path / "metrics.parquet", index=False)
    records = [json.loads(line) for line in (path / "data.jsonl").read_text().splitlines()]
    for row in loop:
        records[row]["generated_output"] = LOOP
    for row in blank:
        records[row]["generated_output"] = "\u200b\ufeff "
    (path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ids = metrics["id"].tolist()
    return {"hit_max": [ids[r] for r in hit], "repeats": [ids[r] for r in loop], "empty": [ids[r] for r in blank]}


def make_experiment(run_dir: Path, name: str = "sel-vs-rand", question: str = "Question") -> Path:
    """A finished two-arm experiment's files, written by hand (no training): arm `sel` answers items
    0-5 right, `rand` items 0-2 (item i's prompt: f"{question} {i}?"); the statistics and the report
    from the library."""
    from threeds.outcomes.experiment import summarize_experiment

    exp = run_dir / "experiments" / name
    described = {"name": name, "run": str(run_dir), "bench": "mmlu-medical", "limit": 8, "shots": 0, "model": {"model": None},
                 "train": {"lora_r": 8, "lr": 5e-5, "epochs": 1, "batch_size": 2, "grad_accum": 1}, "seeds": 1,
                 "baseline": "rand", "arms": [{"name": "sel", "spec": "current", "records": {"seed0": 6}},
                                              {"name": "rand", "spec": "random:same", "records": {"seed0": 6}}]}  # fmt: skip
    (exp / "evals").mkdir(parents=True)
    (exp / "experiment.json").write_text(json.dumps(described))
    for arm, right in (("sel", 6), ("rand", 3)):
        folder = exp / "evals" / arm / "seed0"
        folder.mkdir(parents=True)
        rows = [{"id": f"q{i}", "subject": "anatomy" if i < 4 else "virology", "gold": 0, "pred": 0 if i < right else 1,
                 "correct": i < right, "pred_norm": 0 if i < right else 1, "correct_norm": i < right,
                 "gold_prob": 0.73 if i < right else 0.27, "prompt": f"{question} {i}?", "choices": ["yes", "no"],
                 "logprobs": [-1.0, -2.0] if i < right else [-2.0, -1.0]} for i in range(8)]  # fmt: skip
        (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "summary.json").write_text(json.dumps({"acc": right / 8}))
        train = exp / "arms" / arm / "seed0"
        train.mkdir(parents=True)
        (train / "loss.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 2}) + "\n" for s in (1, 2, 3)))
    units = {f"{a}/seed0": {"arm": a, "seed": 0, "records": 6, "train": "done", "eval": "done", "train_s": 4.0, "eval_s": 9.0, "steps": 3}
             for a in ("sel", "rand")}  # fmt: skip
    (exp / "units.json").write_text(json.dumps(units))
    summarize_experiment(exp)
    return exp
