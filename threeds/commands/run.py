"""`threeds run`: the whole of 3DS in one run directory, rate -> filter -> generate -> score -> select.

Every stage records its settings and input fingerprint under `stages` in the run's manifest. A
stage whose output is there and current is skipped; rating and generation resume per record; a
stage whose settings or input changed is done again (with a warning), and so is everything after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

from threeds.backends import LocalBackend
from threeds.commands.generate import EXPECTED_ERRORS, add_backend_arguments, backend_from_args
from threeds.commands.rate import add_rating_arguments
from threeds.commands.score import add_data_arguments, add_engine_arguments, add_score_arguments
from threeds.commands.select import add_select_arguments, bands_from_args
from threeds.data import fingerprint, read_jsonl, read_records, write_json, write_jsonl
from threeds.generate import generate_records
from threeds.rate import PromptError, filter_by_rating, load_rating_prompt, rate_records
from threeds.rundir import RunDir, RunError
from threeds.score import records_fingerprint, score_run
from threeds.select import select_run, selected_records

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="all of 3DS in one go: rate -> filter -> generate -> score -> select",
        description="Run 3DS end to end into one run directory: Stage 1 (the target model rates each pair, keep "
        "scores >= --quality-threshold), then A' generation, Stage 2 scoring and selection. The selected "
        "records are written to OUT/selected.json. Run the same command again to resume; a stage whose "
        "output is current is skipped, and changing a setting redoes that stage and the ones after it.",
    )  # fmt: skip
    parser.add_argument("--data", required=True, type=Path, help="records: JSON, JSONL, Parquet or CSV")
    add_data_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: cache/<data file name>)")
    add_backend_arguments(parser)
    stage1 = parser.add_argument_group("stage 1: rating")
    add_rating_arguments(stage1, tokens_flag="--rate-max-new-tokens")
    stage1.add_argument("--quality-threshold", type=float, default=85,
                        help="keep records rated at least this, 0-100 (default: 85, as in the paper)")  # fmt: skip
    stage2 = parser.add_argument_group("stage 2: A' generation, scoring and selection")
    stage2.add_argument("--max-new-tokens", type=int, default=512, help="longest A' in tokens (default: 512)")
    add_score_arguments(stage2)
    add_engine_arguments(stage2)
    add_select_arguments(stage2)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    out = args.out or Path("cache") / args.data.stem
    try:
        result = run_pipeline(args, RunDir(out))
    except (PromptError, RunError, ValueError, *EXPECTED_ERRORS) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    return 0


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """The `stages` section of the manifest: each stage's settings, input and outcome."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.all = run.read_manifest().get("stages", {})

    def current(self, name: str, meta: dict, *outputs: str) -> bool:
        """Same settings and input as last time, and the outputs are there."""
        meta = json.loads(json.dumps(meta, default=str))  # as the manifest stores it (tuples -> lists)
        same = {k: self.all.get(name, {}).get(k) for k in meta} == meta
        return same and all(self.run.file(o).exists() for o in outputs)

    def record(self, name: str, **meta: object) -> None:
        self.all[name] = {**self.all.get(name, {}), **meta}
        self.run.update_manifest(stages=self.all)


def _warn_failures(summary: dict) -> None:
    if summary["failed"]:
        log.warning("%s: %d records failed and are left out (see the rows with an \"error\" in %s); "
                    "run the same command again to retry them", summary["stage"], summary["failed"], summary["log"])  # fmt: skip


def run_pipeline(args: argparse.Namespace, run: RunDir) -> dict:
    """All five stages; returns where things are and each stage's counts."""
    run.path.mkdir(parents=True, exist_ok=True)
    stages = Stages(run)
    records, rejects = read_records(args.data, args.duplicate_ids)
    if rejects:
        write_jsonl(run.file("rejects.jsonl"), rejects)
        log.warning("%d input records rejected (see %s)", len(rejects), run.file("rejects.jsonl"))
    backend = backend_from_args(args)

    # Stage 1: rate (resumes per record; ratings made another way are redone) and filter.
    template = load_rating_prompt(args.prompt)
    rate_config = {**backend.signature, "prompt": args.prompt, "prompt_sha": _digest(template),
                   "max_new_tokens": args.rate_max_new_tokens}  # fmt: skip
    data = {"path": str(args.data), "fingerprint": fingerprint(args.data), "n_records": len(records)}
    stages.record("rate", config=rate_config, data=data)
    summary = rate_records(records, backend, run.file("ratings.jsonl"), template, args.rate_max_new_tokens,
                           reasks=args.reasks, overwrite=True)  # fmt: skip
    stages.record("rate", summary=summary)
    _warn_failures(summary)
    kept, report = filter_by_rating(records, read_jsonl(run.file("ratings.jsonl")), args.quality_threshold)
    write_jsonl(run.file("filtered.jsonl"), kept)
    stages.record("filter", config={"quality_threshold": args.quality_threshold}, report=report)
    log.info("stage 1: %d of %d records rated >= %g (%d unrated)", report["kept"], report["total"],
             args.quality_threshold, report["unrated"])  # fmt: skip
    if not kept:
        raise RunError(f"no record passed stage 1 ({report}); lower --quality-threshold or check {run.file('ratings.jsonl')}")

    # A' for the kept records (resumes per record).
    generated, gen_summary = generate_records(kept, backend, run.file("generations.jsonl"), args.max_new_tokens, overwrite=True)
    stages.record("generate", config={**backend.signature, "max_new_tokens": args.max_new_tokens}, summary=gen_summary)
    _warn_failures(gen_summary)
    if not generated:
        raise RunError(f"no A' could be generated; see the errors in {run.file('generations.jsonl')}")
    if isinstance(backend, LocalBackend):
        backend.close()  # scoring loads its own copy

    # Stage 2: score (resumable chunks), then select.
    score_meta = {"config": {"model": args.model, "max_length": args.max_length, "function_words": args.function_words,
                             "template": args.template, "system": args.system, "chunk_size": args.chunk_size,
                             **({"dtype": args.dtype} if args.dtype != "auto" else {})},
                  "input": records_fingerprint(generated)}  # fmt: skip
    fresh = not stages.current("score", score_meta)
    if fresh and (run.file("metrics.parquet").exists() or run.chunks.exists()):
        log.warning("score: the records or settings changed since the last run; scoring again")
    stages.record("score", **score_meta)  # before scoring, so a killed run resumes its chunks
    manifest = score_run(
        generated, run.path, model_spec=args.model, max_length=args.max_length, function_words=args.function_words,
        batch_tokens=args.batch_tokens, template=args.template, system=args.system, chunk_size=args.chunk_size,
        data_path=str(args.data), rejects=rejects, overwrite=fresh, engine=args.engine, ray_address=args.ray_address,
        ray_workers=args.ray_workers, dtype=args.dtype,
    )  # fmt: skip

    select_meta = {"config": {"bands": bands_from_args(args), "sample_num": args.sample_num,
                              "atten_method": args.atten_method, "seed": args.seed},
                   "input": _digest(score_meta)}  # fmt: skip
    if stages.current("select", select_meta, "selection.json", "selected.json"):
        selection = json.loads(run.file("selection.json").read_text())
        log.info("select: up to date")
    else:
        selection = select_run(run.path, bands_from_args(args), args.sample_num, args.atten_method, args.seed)
        write_json(run.file("selected.json"), selected_records(run.path, selection["selected_ids"]))
        stages.record("select", **select_meta, report=selection["report"])
    run.write_progress("done", len(selection["selected_ids"]), len(selection["selected_ids"]))
    return {
        "run": str(run.path), "selected": len(selection["selected_ids"]), "out": str(run.file("selected.json")),
        "rate": summary, "filter": report, "generate": gen_summary, "score": manifest.get("report"),
        "select": selection["report"],
    }  # fmt: skip
