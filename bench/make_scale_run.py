"""A synthetic run directory at the paper's scale, streamed to disk in chunks (issue 30 item 1).

3DS was run on ~1.9M records with 7B models (hidden size 4096). This writes a run directory in
exactly the layout threeds reads (docs/DESIGN.md, "Run directory"): input.jsonl, ratings.jsonl,
metrics.parquet, data.jsonl, embeddings.npy, manifest.json and tokens.parquet for the first
`--token-rows` samples, without ever holding more than one chunk of rows in memory.

What makes it behave like real data:
- texts: five medical sources with their own length distributions (MedQA vignettes, PubMedQA
  abstracts, forum questions...), sentences drawn from a shared pool of medical-sounding words;
- embeddings: a mixture of clusters (each source has its own topics, of unequal sizes) on a
  low-dimensional latent space mapped into `dim` dimensions, plus isotropic noise, a common
  offset and a few large outlier dimensions as LLM hidden states have: k-center and UMAP see
  structure, not a ball of noise;
- metrics: the three difficulty metrics independent of each other (instruction perplexity
  shifted per source), so the paper's bands (25-75 on all three) keep 12.5% of the finite rows:
  ~237.5k of 1.9M, as in issue 30. A few rows have no A' loss (NaN), as a real Stage 2 leaves.
- Stage 1: every scored record is rated >= 85; `n // 20` more are rated below and never scored.

Same seed, same files (each chunk draws from its own seeded generator).

    python bench/make_scale_run.py --n 1900000 --dim 4096 --dtype float16 --out /work/scale/paper
    python bench/make_scale_run.py --n 100000 --dim 896 --out /work/scale/s100k
    python bench/make_scale_run.py --short-copy-of /work/scale/paper --out /work/scale/paper-short
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SOURCES = ("medqa", "pubmedqa", "medmcqa", "healthcaremagic", "medquad")
SOURCE_SHARE = (0.10, 0.11, 0.10, 0.59, 0.10)
# (instruction, output, A') length in words: lognormal medians per source; sigma 0.45
LENGTHS = {
    "medqa": (110, 60, 70),
    "pubmedqa": (230, 45, 60),
    "medmcqa": (35, 40, 55),
    "healthcaremagic": (75, 110, 120),
    "medquad": (9, 180, 140),
}
PREFIX = {
    "medqa": "A patient presents as follows. ",
    "pubmedqa": "Context: ",
    "medmcqa": "Question: ",
    "healthcaremagic": "Hi doctor, ",
    "medquad": "What is known about ",
}
WORDS = (
    "patient fever cough pain chest abdominal acute chronic diagnosis treatment therapy dose mg daily weeks months "
    "years history examination blood pressure heart rate infection bacterial viral antibiotic insulin diabetes "
    "hypertension asthma migraine anemia sepsis gout renal hepatic cardiac pulmonary lesion biopsy tumor benign "
    "malignant symptoms signs laboratory elevated decreased normal serum level test imaging ct mri x-ray ultrasound "
    "surgery recovery risk factor study trial cohort randomized outcome mortality incidence prevalence association "
    "significant results methods conclusion the a of and to in is was with for on as by at from that which this "
    "may can should also not or be are were has have been clinical medical doctor hospital care child adult woman "
    "man pregnancy infant elderly vaccine immune response inflammation swelling rash skin bone joint muscle nerve "
    "brain stroke seizure dizziness nausea vomiting diarrhea fatigue weight loss gain sleep anxiety depression"
).split()
FUNCTION = {"the", "a", "of", "and", "to", "in", "is", "was", "with", "for", "on", "as", "by", "at", "from", "that"}
SENTENCES = 20_000
CLUSTERS_PER_SOURCE = 40
LATENT = 48
QUALITY_THRESHOLD = 85.0
MAX_NEW_TOKENS = 512


def sentence_pool(rng: np.random.Generator) -> list[str]:
    """SENTENCES sentences of 6-24 words, Zipf-like word frequencies; texts are made of these."""
    weights = 1.0 / np.arange(1, len(WORDS) + 1) ** 0.9
    words = rng.choice(len(WORDS), size=(SENTENCES, 24), p=weights / weights.sum())
    lengths = rng.integers(6, 25, SENTENCES)
    return [" ".join(WORDS[w] for w in row[:k]).capitalize() + "." for row, k in zip(words, lengths)]


class Texts:
    """Texts of about a given number of words, as runs of consecutive pool sentences (~15 words each)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.pool = sentence_pool(rng)
        self.doubled = self.pool + self.pool  # a run may wrap around the end

    def text(self, start: int, words: int) -> str:
        return " ".join(self.doubled[start : start + max(1, words // 15)])


class Embeddings:
    """The cluster mixture (see the module docstring); `rows(rng, cluster)` draws one chunk."""

    def __init__(self, rng: np.random.Generator, dim: int) -> None:
        k = len(SOURCES) * CLUSTERS_PER_SOURCE
        self.centres = rng.normal(0.0, 1.6, (k, LATENT)).astype(np.float32)
        self.spread = rng.uniform(0.4, 1.0, k).astype(np.float32)
        self.project = (rng.normal(0.0, 1.0, (LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
        self.offset = rng.normal(0.0, 0.5, dim).astype(np.float32)
        self.offset[rng.choice(dim, min(3, dim), replace=False)] = 40.0  # the few huge hidden-state dims
        self.noise = 0.35
        sizes = rng.dirichlet(np.full(CLUSTERS_PER_SOURCE, 0.8), len(SOURCES))  # unequal topics per source
        self.topic_p = sizes.astype(np.float64)

    def clusters(self, rng: np.random.Generator, source: np.ndarray) -> np.ndarray:
        topic = np.empty(len(source), dtype=np.int64)
        for s in range(len(SOURCES)):
            at = np.flatnonzero(source == s)
            topic[at] = rng.choice(CLUSTERS_PER_SOURCE, len(at), p=self.topic_p[s])
        return source * CLUSTERS_PER_SOURCE + topic

    def rows(self, rng: np.random.Generator, cluster: np.ndarray) -> np.ndarray:
        latent = self.centres[cluster] + self.spread[cluster, None] * rng.standard_normal((len(cluster), LATENT), dtype=np.float32)
        out = latent @ self.project
        out += self.offset
        out += self.noise * rng.standard_normal(out.shape, dtype=np.float32)
        return out


def metrics_chunk(rng: np.random.Generator, ids: list[str], source: np.ndarray, lengths: np.ndarray) -> pa.Table:
    """The columns of threeds.names.SCORE_COLUMNS; the three metrics independent of each other."""
    n = len(ids)
    ins_ppl = rng.lognormal(2.0 + 0.15 * source, 0.6)
    gt_mean, gen_mean = rng.gamma(3.0, 0.5, n), rng.gamma(2.0, 0.4, n)
    gt_max, gen_max = gt_mean * rng.uniform(1.5, 3.0, n), gen_mean * rng.uniform(1.5, 3.0, n)
    no_answer = rng.random(n) < 0.001  # no A' token left after filtering
    gen_mean[no_answer] = gen_max[no_answer] = np.nan
    prompt, gt, gen = (np.maximum(1, (lengths[:, j] * 1.3).astype(np.int64)) for j in range(3))
    gen = np.minimum(gen + 1, MAX_NEW_TOKENS + 1)
    return pa.table({
        "id": ids, "ins_ppl": ins_ppl, "gt_wloss_mean": gt_mean, "gt_wloss_max": gt_max,
        "gen_wloss_mean": gen_mean, "gen_wloss_max": gen_max, "prompt_tokens": prompt, "gt_tokens": gt + 1,
        "gen_tokens": gen, "gt_kept_tokens": (gt * 0.6).astype(np.int64), "gen_kept_tokens": (gen * 0.6).astype(np.int64),
        "gt_truncated": np.zeros(n, bool), "gen_truncated": np.zeros(n, bool), "truncated": np.zeros(n, bool),
    })  # fmt: skip


def token_table(records: list[dict], rng: np.random.Generator) -> pa.Table:
    """tokens.parquet rows (one per word or punctuation mark, then the end-of-turn marker) for `records`."""
    columns: dict[str, list] = {name: [] for name in ("id", "response", "pos", "token", "start", "end", "loss", "w_mean", "w_max", "function_word")}
    for rec in records:
        for response, field in (("gt", "output"), ("gen", "generated_output")):
            text, pos, start = rec[field], 0, 0
            for word in text.split(" "):
                token = word if start == 0 else " " + word
                end = start + len(token)
                for name, value in (("id", rec["id"]), ("response", response), ("pos", pos), ("token", token), ("start", start),
                                    ("end", end), ("function_word", word.lower().strip(".") in FUNCTION)):  # fmt: skip
                    columns[name].append(value)
                pos, start = pos + 1, end
            for name, value in (("id", rec["id"]), ("response", response), ("pos", pos), ("token", "<|im_end|>"), ("start", len(text)),
                                ("end", len(text) + 10), ("function_word", False)):  # fmt: skip
                columns[name].append(value)
    n = len(columns["id"])
    columns["loss"], columns["w_mean"], columns["w_max"] = rng.gamma(2.0, 1.0, n), rng.random(n), rng.random(n)
    return pa.table(columns)


def manifest(out: Path, n: int, dropped: int, dim: int, dtype: str, seed: int) -> dict:
    """The manifest `threeds run` writes, trimmed to what threeds reads (as tests/synthetic_run.py)."""
    data = {"path": str(out / "input.jsonl"), "fingerprint": f"synthetic-scale-{seed}", "n_records": n + dropped}
    return {
        "stages": {
            "rate": {"data": data},
            "filter": {"config": {"quality_threshold": QUALITY_THRESHOLD}},
            "generate": {"config": {"backend": "local", "max_new_tokens": MAX_NEW_TOKENS}, "summary": {"done": n}},
            "select": {"config": {"bands": {m: [25.0, 75.0] for m in ("ins_ppl", "gen_wloss", "gt_wloss")},
                                  "sample_num": 5000, "atten_method": "mean", "seed": 0}},  # fmt: skip
        },
        "model": {"spec": None, "name_or_path": f"synthetic (hidden size {dim}, embeddings {dtype})"},
        "data": {"path": str(out / "input.jsonl"), "fingerprint": f"synthetic-scale-{seed}", "n_records": n},
    }


def rating(sample_id: str, score: float) -> str:
    return json.dumps({"id": sample_id, "score": score, "raw": f"{score:g}", "backend": "local", "model": "synthetic",
                       "seconds": 0.1, "error": None}) + "\n"  # fmt: skip


def make_scale_run(out: Path, n: int, dim: int, dtype: str = "float32", seed: int = 0, chunk: int = 16384,
                   token_rows: int = 1000, log=None) -> Path:  # fmt: skip
    """Write the run directory `out` (created; it must not hold a run yet); returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if any((out / name).exists() for name in ("metrics.parquet", "embeddings.npy", "data.jsonl")):
        raise SystemExit(f"{out}: already holds a run; use a new --out")
    rng = np.random.default_rng([seed, 0])
    texts, space = Texts(rng), Embeddings(rng, dim)
    dropped = n // 20
    emb = np.lib.format.open_memmap(out / "embeddings.npy", mode="w+", dtype=np.dtype(dtype), shape=(n, dim))
    started = time.perf_counter()
    writer = tokens = None
    with open(out / "input.jsonl", "w") as inp, open(out / "data.jsonl", "w") as data, open(out / "ratings.jsonl", "w") as rated:
        for c, lo in enumerate(range(0, n + dropped, chunk)):
            hi = min(lo + chunk, n + dropped)
            crng = np.random.default_rng([seed, 1, c])
            source = crng.choice(len(SOURCES), hi - lo, p=SOURCE_SHARE)
            medians = np.array([LENGTHS[s] for s in SOURCES], dtype=float)[source]
            lengths = np.maximum(1, medians * crng.lognormal(0.0, 0.45, medians.shape)).astype(np.int64)
            starts = crng.integers(0, SENTENCES, (hi - lo, 3))
            scored = np.arange(lo, hi) < n
            ids = [f"s{i:07d}" if i < n else f"d{i - n:07d}" for i in range(lo, hi)]
            scores = np.where(scored, crng.uniform(QUALITY_THRESHOLD, 100, hi - lo), crng.uniform(0, QUALITY_THRESHOLD, hi - lo)).round(1)
            records = []
            for j, sample_id in enumerate(ids):
                name = SOURCES[source[j]]
                rec = {"id": sample_id, "instruction": PREFIX[name] + texts.text(starts[j, 0], lengths[j, 0]),
                       "output": texts.text(starts[j, 1], lengths[j, 1]), "source": name}  # fmt: skip
                inp.write(json.dumps(rec) + "\n")
                rated.write(rating(sample_id, float(scores[j])))
                if scored[j]:
                    rec = {"id": sample_id, "instruction": rec["instruction"], "output": rec["output"],
                           "generated_output": texts.text(starts[j, 2], lengths[j, 2]), "source": name}  # fmt: skip
                    data.write(json.dumps(rec) + "\n")
                    records.append(rec)
            k = int(scored.sum())
            if k == 0:
                continue
            table = metrics_chunk(crng, ids[:k], source[:k], lengths[:k])
            if writer is None:
                writer = pq.ParquetWriter(out / "metrics.parquet", table.schema)
            writer.write_table(table)
            emb[lo : lo + k] = space.rows(crng, space.clusters(crng, source[:k]))
            if lo < token_rows:
                table = token_table(records[: token_rows - lo], crng)
                tokens = tokens or pq.ParquetWriter(out / "tokens.parquet", table.schema)
                tokens.write_table(table)
            if log is not None and (c % 10 == 0 or hi >= n):
                done = min(hi, n)
                log(f"{done:,} / {n:,} rows, {time.perf_counter() - started:.0f} s")
    for done in (writer, tokens):
        if done is not None:
            done.close()
    emb.flush()
    del emb
    (out / "rejects.jsonl").write_text("")
    (out / "manifest.json").write_text(json.dumps(manifest(out, n, dropped, dim, dtype, seed), indent=1))
    index_records(out)
    return out


def index_records(out: Path) -> None:
    """data.jsonl's row index, its records' sources and their A' checks, as Stage 2 leaves them
    (`RunDir.consolidate`, `keep_answer_checks`): a first open of the run (the app, `threeds select`)
    then costs what it costs after a real `threeds score`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from threeds.rundir.check import read_scored_records
    from threeds.rundir.sources import scored_sources
    from threeds.selection.answer_flags import cached_answer_checks

    records = read_scored_records(out, pq.read_table(out / "metrics.parquet", columns=["id"])["id"].to_pylist())
    scored_sources(out, records)
    cached_answer_checks(out, records)


def short_copy(source: Path, out: Path) -> Path:
    """`out`: links to every file of the run `source` but data.jsonl, written anew with one short
    sentence per text (~200 bytes a record, as tests/synthetic_run.py writes): for the code before
    issue 30, which refuses a data.jsonl over 2 GB (--max-data-mb) and parses it whole."""
    out.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.is_file() and entry.name in ("manifest.json", "ratings.jsonl", "rejects.jsonl", "metrics.parquet", "embeddings.npy", "tokens.parquet", "input.jsonl"):
            (out / entry.name).symlink_to(entry.resolve())
    ids = pq.read_table(source / "metrics.parquet", columns=["id"]).column("id").to_pylist()
    with open(out / "data.jsonl", "w") as fh:
        for i, sample_id in enumerate(ids):
            fh.write(json.dumps({"id": sample_id, "instruction": f"What is the treatment of case {i}?", "output": f"Rest and fluids help in case {i}.",
                                 "generated_output": f"See a doctor about case {i}.", "source": SOURCES[i % len(SOURCES)]}) + "\n")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_900_000, help="scored records (default: 1,900,000)")
    parser.add_argument("--dim", type=int, default=4096, help="embedding width (default: 4096, a 7B model's hidden size)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="embeddings.npy dtype")
    parser.add_argument("--out", type=Path, required=True, help="run directory to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=16384, help="rows per chunk (memory: about chunk x dim x 8 bytes)")
    parser.add_argument("--token-rows", type=int, default=1000, help="samples with token rows in tokens.parquet (default: 1000)")
    parser.add_argument("--short-copy-of", type=Path, help="instead: links to this run's files with a data.jsonl of short texts (for the code before issue 30)")
    args = parser.parse_args(argv)
    if args.short_copy_of:
        short_copy(args.short_copy_of, args.out)
        return 0
    if args.n < 1 or args.dim < 1 or args.chunk < 1:
        parser.error("--n, --dim and --chunk must be positive")
    started = time.perf_counter()
    make_scale_run(args.out, args.n, args.dim, args.dtype, args.seed, args.chunk, args.token_rows, log=lambda line: print(line, flush=True))
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
