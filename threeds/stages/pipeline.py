"""The stages of 3DS in one place: rate -> filter -> generate -> score -> select.

This module owns their order, the settings and input fingerprint each stage records under
`stages` in the run's manifest (written and read only here, through `Stages`), and the rule that
a stage whose output is there and current is skipped. Rating and generation resume per record
(`threeds.stages.joblog`), scoring per chunk; a stage whose settings or input changed is done again, and
so is everything after it. The CLI's commands and the app's launcher call these functions; the
two scoring engines (`threeds.stages.score.LocalEngine`, `threeds.stages.engine_ray.RayEngine`) only turn chunks
of records into results, and `score_chunks` writes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from threeds.config import EngineConfig, ModelConfig, RunConfig, ScoreConfig
from threeds.io.data import (
    DataError,
    file_positions,
    fingerprint,
    read_data,
    read_jsonl,
    require_fields,
    require_records,
    take_records,
    write_json,
    write_jsonl,
)  # fmt: skip
from threeds.io.lock import locked
from threeds.io.sampling import stratified_sample
from threeds.model.backends import Backend, LocalBackend, OpenAIBackend
from threeds.names import METRIC_COLUMNS
from threeds.rundir import layout
from threeds.rundir.check import read_scored_records, selected_records
from threeds.rundir.progress import ProgressFile, TerminalBar, fan_out, set_ahead
from threeds.rundir.proxy_link import proxy_link
from threeds.rundir.write import RunDir, RunError, package_versions
from threeds.selection.answer_flags import keep_answer_checks
from threeds.selection.apply import select_dir
from threeds.stages.engine import Engine
from threeds.stages.generate import generate_records
from threeds.stages.joblog import Check
from threeds.stages.preflight import PREFLIGHT_RECORDS, check_ratings, probe_answers
from threeds.stages.rate import (
    NO_SCORE,
    filter_by_rating,
    load_rating_prompt,
    rate_records,
    rating_prompt_name,
)

log = logging.getLogger(__name__)

STAGES = ("rate", "filter", "generate", "score", "select")
# Marks scores that can be compared (and a run's chunks mixed): raised whenever a change moves the
# numbers of the same records and settings. 2: the prompt tokenised on its own (issue 23).
SCORE_VERSION = 2


def digest(obj: object) -> str:
    """Short hash of a JSON-able value (a prompt, a stage's settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def records_fingerprint(records: Sequence[dict]) -> str:
    """Content hash of the records to score: a changed input never resumes an old run."""
    sha = hashlib.sha256()
    for record in records:
        sha.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
    return sha.hexdigest()


class Stages:
    """The `stages` section of the manifest: per stage, `config`, `input` or `data`, and its outcome
    (`summary` or `report`)."""

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

    def pace(self, name: str) -> float | None:
        """Seconds per record (per sequence for scoring) the stage took when it last worked here; None if never."""
        if name == "score":
            manifest = self.run.read_manifest()
            seconds, scored = manifest.get("timings", {}).get("score_seconds"), manifest.get("report", {}).get("n_scored")
            return seconds / (2 * scored) if seconds and scored else None
        summary = self.all.get(name, {}).get("summary", {})
        return summary["seconds"] / summary["new"] if summary.get("new") and summary.get("seconds") else None

    def plan_ahead(self, current: str, records: int) -> None:
        """progress.json's stages still to come after `current` for `records` records, at their pace here."""
        units = {"generate": records, "score": 2 * records}
        later = [s for s in STAGES[STAGES.index(current) + 1 :] if s in units]
        set_ahead(self.run.file(layout.PROGRESS), [{"stage": s, "units": units[s], "seconds_per_unit": self.pace(s)} for s in later])


def make_backend(config: RunConfig) -> Backend:
    """The backend for rating and A' that `config` asks for (the Ray one for local + --engine ray).

    The API key of an OpenAI-compatible server comes from THREEDS_API_KEY or OPENAI_API_KEY.
    """
    backend, spec = config.backend, config.model
    if backend.backend == "local" and config.engine.engine == "ray":
        from threeds.stages.engine_ray import RayLocalBackend

        return RayLocalBackend(spec.model, template=spec.template, system=spec.system, batch_size=backend.batch_size,
                               address=config.engine.ray_address, workers=config.engine.ray_workers, dtype=spec.dtype)  # fmt: skip
    if backend.backend == "local":
        return LocalBackend(spec.model, template=spec.template, system=spec.system, batch_size=backend.batch_size,
                            dtype=spec.dtype, batch_tokens=backend.gen_batch_tokens)  # fmt: skip
    return OpenAIBackend(
        backend.base_url, backend.api_model, system=spec.system, concurrency=backend.concurrency,
        timeout=backend.timeout, retries=backend.retries, backoff=backend.retry_backoff,
        max_consecutive_failures=backend.max_consecutive_failures,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ scoring


def score_settings(score: ScoreConfig, spec: ModelConfig) -> dict:
    """What scores depend on, as the manifest's `score_config` and the score stage record them."""
    return {"score_version": SCORE_VERSION, **score.recorded(spec)}


def score_config(score: ScoreConfig, spec: ModelConfig, records: Sequence[dict], loaded: tuple | None = None) -> dict:
    """What a scored run depends on (manifest `score_config`): a run is resumed only if it matches."""
    model = spec.model or (loaded[0].name_or_path if loaded is not None else None)
    return {**score_settings(score, spec), "model": model, "data_fingerprint": records_fingerprint(records)}


def score_run(
    records: list[dict],
    run_dir: str | os.PathLike,
    score: ScoreConfig = ScoreConfig(),
    spec: ModelConfig = ModelConfig(),
    engine: EngineConfig = EngineConfig(),
    *,
    loaded: tuple | None = None,
    data_path: str | None = None,
    rejects: Sequence[dict] = (),
    positions: dict[str, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Score `records` into `run_dir` (resumable, holding its lock) and return the run's manifest.

    `loaded`: a (model, tokenizer) to use instead of loading `spec.model`. `rejects` (from reading
    the input) and records without a non-empty `generated_output` go to `rejects.jsonl`, numbered
    by position in the input file (`positions`; by default `records` and `rejects` are taken as
    `read_records` returned them).
    """
    with locked(run_dir):
        return _score_run(records, RunDir(run_dir), score, spec, engine, loaded, data_path, rejects, positions,
                          overwrite, progress)  # fmt: skip


def _score_run(
    records: list[dict], run: RunDir, score: ScoreConfig, spec: ModelConfig, engine: EngineConfig, loaded: tuple | None,
    data_path: str | None, rejects: Sequence[dict], positions: dict[str, int] | None, overwrite: bool, progress: bool,
) -> dict:  # fmt: skip
    kept, missing = require_fields(records, ["generated_output"], positions or file_positions(records, list(rejects)))
    rejects = sorted([*rejects, *missing], key=lambda r: r["index"])
    if not kept:
        first = f"; the first, at index {rejects[0]['index']}: field {rejects[0]['field']}: {rejects[0]['reason']}" if rejects else ""
        raise DataError(f"{data_path or run.path}: no record to score ({len(rejects)} rejected{first})")
    config = score_config(score, spec, kept, loaded)
    manifest = _open_scoring(run, config, overwrite)
    if spec.proxy_check is not None:
        manifest = run.update_manifest(proxy_check=proxy_link(spec.proxy_check, spec.model))
    run.remove_stale_temps()
    if manifest.get("status") == "scored":
        run.remove_chunks()  # a run killed after its completion marker, while cleaning up
        log.info("%s: already scored with this configuration; nothing to do", run.path)
        return manifest
    if rejects:
        write_jsonl(run.file(layout.REJECTS), rejects)
        log.warning("%d records rejected (see %s)", len(rejects), run.file(layout.REJECTS))
    timings = manifest.get("timings", {}) if manifest.get("score_config") == config else {}
    run.update_manifest(
        status="scoring", score_config=config, config={**manifest.get("config", {}), **config},
        data={"path": data_path, "fingerprint": config["data_fingerprint"], "n_records": len(records) + len(rejects) - len(missing),
              "n_rejected": len(rejects), "n_scored": len(kept)},
        packages=package_versions(), timings=timings,
    )  # fmt: skip
    chunks = [kept[i : i + score.chunk_size] for i in range(0, len(kept), score.chunk_size)]
    pending = [i for i in range(len(chunks)) if i not in run.done_chunks()]
    if pending:
        spent = score_chunks(run, _engine(score, spec, engine, loaded), chunks, pending, progress)
        timings = {name: timings.get(name, 0.0) + seconds for name, seconds in spent.items()}
    metrics = run.consolidate(len(chunks), kept, score.embeddings_dtype)
    keep_answer_checks(run.path, read_scored_records(run.path, list(metrics["id"])), [r.get("generated_output") for r in kept])
    manifest = run.update_manifest(status="scored", timings=timings, report=score_report(metrics))  # the marker, last
    run.remove_chunks()
    return manifest


def _open_scoring(run: RunDir, config: dict, overwrite: bool) -> dict:
    """The manifest to go on from: scores of another configuration are cleared (with `overwrite`) or
    refused; `status` "scored" means there is nothing to do."""
    manifest = run.read_manifest()
    if overwrite or manifest.get("score_config") != config:
        if manifest.get("score_config") and not overwrite and (run.chunks.exists() or run.file(layout.METRICS).exists()):
            raise RunError(f"{run.path} holds scores made {_made_how(manifest['score_config'])}; "
                           "pass --overwrite to replace them or choose another --out")  # fmt: skip
        run.clear_scores()
        manifest.pop("status", None)
    elif manifest.get("status") == "scored" and not all(run.file(name).exists() for name in layout.SCORE_OUTPUTS):
        manifest.pop("status")
    run.path.mkdir(parents=True, exist_ok=True)
    return manifest


def _made_how(recorded: dict) -> str:
    """What differs about a run's earlier scores, for the message that refuses to mix them."""
    version = recorded.get("score_version", 1)
    if version != SCORE_VERSION:
        return (f"by an older threeds (scores version {version}, this one makes {SCORE_VERSION}: the prompt is "
                "now tokenised on its own, docs/SPEC-3DS.md), which cannot be mixed with new ones")  # fmt: skip
    return "with another configuration or data"


def _engine(score: ScoreConfig, spec: ModelConfig, engine: EngineConfig, loaded: tuple | None) -> Engine:
    """The engine `engine` names; imported here, so commands that do not score start without torch's models."""
    if engine.engine == "ray":
        from threeds.stages.engine_ray import RayEngine

        return RayEngine(score, spec, engine)
    from threeds.stages.score import LocalEngine

    return LocalEngine(score, spec, loaded)


def score_chunks(run: RunDir, engine: Engine, chunks: list[list[dict]], pending: list[int], progress: bool) -> dict[str, float]:
    """The one chunk writer: start `engine`, write each chunk it returns the moment it arrives (the
    manifest names the model once known), keep progress.json current; returns the timings."""
    total = 2 * sum(len(chunks[i]) for i in pending)
    before = 2 * sum(map(len, chunks)) - total  # sequences of the chunks an earlier run finished
    file = ProgressFile(run.file(layout.PROGRESS), "score", before + total, before, unit="sequences")
    file.phase("loading the model")
    started = time.perf_counter()
    described = engine.start()
    if described:
        run.update_manifest(**described)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    file.phase("score")
    bar = TerminalBar("score", "seq", enabled=progress)
    report, done = fan_out(bar, file), [before]
    report(before, before + total)

    def advance(n: int) -> None:
        done[0] += n
        report(done[0], before + total)  # per batch; the file's writes rate-limited

    try:
        for scored in engine.results(chunks, pending, advance):
            if scored.info and not described:
                run.update_manifest(**scored.info)
                described = scored.info
            result = scored.result
            run.write_chunk(scored.index, result.metrics, result.embeddings, result.tokens)
        file.close()
    finally:
        bar.close()
        engine.close()
    return {"load_seconds": load_seconds, "score_seconds": time.perf_counter() - started}



def score_report(metrics: pd.DataFrame) -> dict:
    """Counts a user wants after scoring: truncations and samples left without a response token."""
    return {
        "n_scored": len(metrics),
        "n_truncated": int(metrics["truncated"].sum()),
        "n_nan": {c: int(metrics[c].isna().sum()) for c in METRIC_COLUMNS[1:]},
    }


# ------------------------------------------------------------------------------- threeds run


def run_pipeline(data: Path, run: RunDir, config: RunConfig) -> dict:
    """All five stages into `run`, holding its lock; returns where things are and each stage's counts."""
    with locked(run.path):
        return _run_stages(data, run, config)


def _run_stages(data: Path, run: RunDir, config: RunConfig) -> dict:
    run.remove_stale_temps()  # a killed run's; this process holds the lock, so none is being written
    if config.model.proxy_check is not None:
        proxy_link(config.model.proxy_check, config.model.model)  # a wrong link stops the run before any work
    stages = Stages(run)
    records, rejects = read_data(data, config.data)
    require_records(data, records, rejects)
    if rejects:
        write_jsonl(run.file(layout.REJECTS), rejects)
        log.warning("%d input records rejected (see %s)", len(rejects), run.file(layout.REJECTS))
    subset = config.subset
    if subset.stratify is not None:
        records = stratified_sample(records, subset.sample, subset.stratify, seed=subset.sample_seed)[0]
    else:
        records = take_records(records, subset)
    backend = make_backend(config)
    rated = _rate(stages, data, records, len(rejects), backend, config)
    kept, report = _filter(stages, records, config)
    generated, gen_summary = _generate(stages, kept, backend, config)
    score_meta = _score(stages, data, generated, rejects, file_positions(records, rejects), config)
    selection = _select(stages, score_meta, config)
    run.write_progress("done", len(selection["selected_ids"]), len(selection["selected_ids"]))
    return {
        "run": str(run.path), "selected": len(selection["selected_ids"]), "out": str(run.file(layout.SELECTED)),
        "rate": rated, "filter": report, "generate": gen_summary, "score": run.read_manifest().get("report"),
        "select": selection["report"],
    }  # fmt: skip


def _warn_failures(summary: dict) -> None:
    if summary["failed"]:
        log.warning("%s: %d records failed and are left out (see the rows with an \"error\" in %s); "
                    "run the same command again to retry them", summary["stage"], summary["failed"], summary["log"])  # fmt: skip


def _rate(stages: Stages, data: Path, records: list[dict], rejected: int, backend: Backend, config: RunConfig) -> dict:
    """Stage 1 rating (resumes per record; ratings made another way are redone). Its summary counts the
    input records rejected before it (`rejected`, listed in rejects.jsonl) beside those it rated."""
    run, rate = stages.run, config.rate
    prompt = rating_prompt_name(rate.prompt, records)
    template = load_rating_prompt(prompt)
    recorded = {**backend.signature, "prompt": prompt, "prompt_sha": digest(template),
                "max_new_tokens": rate.max_new_tokens, **rate.recorded()}  # fmt: skip
    source = {"path": str(data), "fingerprint": fingerprint(data), "n_records": len(records), **config.subset.recorded()}
    stages.record("rate", config=recorded, data=source)
    stages.plan_ahead("rate", len(records))  # A' for every record at most: the filter is still to come
    check = _preflight(records, backend, prompt, template, config) if config.preflight.preflight else None
    summary = rate_records(records, backend, run.file(layout.RATINGS), rate, template=template, overwrite=True,
                           progress_path=run.file(layout.PROGRESS), check_first=check)  # fmt: skip
    summary = {**summary, "rejected": rejected}
    stages.record("rate", summary=summary)
    _warn_failures(summary)
    return summary


def _preflight(records: list[dict], backend: Backend, prompt: str, template: str, config: RunConfig) -> tuple[int, Check]:
    """The check of the first records' ratings, then a short A' for them (`threeds.stages.preflight`)."""
    by_id = {r["id"]: r for r in records}

    def check(rows: list[dict]) -> None:
        check_ratings(rows, prompt, template, NO_SCORE)
        probe_answers([by_id[r["id"]] for r in rows], backend, config.generate.max_new_tokens)

    return PREFLIGHT_RECORDS, check


def _filter(stages: Stages, records: list[dict], config: RunConfig) -> tuple[list[dict], dict]:
    run, threshold = stages.run, config.filter.quality_threshold
    kept, report = filter_by_rating(records, read_jsonl(run.file(layout.RATINGS)), threshold)
    write_jsonl(run.file(layout.FILTERED), kept)
    stages.record("filter", config={"quality_threshold": threshold}, report=report)
    log.info("stage 1: %d of %d records rated >= %g (%d unrated)", report["kept"], report["total"], threshold,
             report["unrated"])  # fmt: skip
    if not kept:
        raise RunError(f"no record passed stage 1 ({report}); lower --quality-threshold or check {run.file(layout.RATINGS)}")
    return kept, report


def _generate(stages: Stages, kept: list[dict], backend: Backend, config: RunConfig) -> tuple[list[dict], dict]:
    """A' for the kept records (resumes per record); frees a local model, as scoring loads its own."""
    run, tokens = stages.run, config.generate.max_new_tokens
    stages.plan_ahead("generate", len(kept))
    generated, summary = generate_records(kept, backend, run.file(layout.GENERATIONS), tokens, overwrite=True,
                                          progress_path=run.file(layout.PROGRESS))  # fmt: skip
    stages.record("generate", config={**backend.signature, "max_new_tokens": tokens}, summary=summary)
    _warn_failures(summary)
    if not generated:
        raise RunError(f"no A' could be generated; see the errors in {run.file(layout.GENERATIONS)}")
    if isinstance(backend, LocalBackend):
        backend.close()
    return generated, summary


def _score(stages: Stages, data: Path, generated: list[dict], rejects: list[dict], positions: dict[str, int],
           config: RunConfig) -> dict:  # fmt: skip
    """Stage 2 scoring (resumable chunks); returns the stage's recorded settings and input."""
    run, score, spec = stages.run, config.score, config.model
    meta = {"config": score_settings(score, spec), "input": records_fingerprint(generated)}
    fresh = not stages.current("score", meta)
    if fresh and (run.file(layout.METRICS).exists() or run.chunks.exists()):
        log.warning("score: the records, settings or scores version changed since the last run; scoring again")
    stages.record("score", **meta)  # before scoring, so a killed run resumes its chunks
    stages.plan_ahead("score", len(generated))
    score_run(generated, run.path, score, spec, config.engine, data_path=str(data), rejects=rejects, positions=positions,
              overwrite=fresh)  # fmt: skip
    return meta


def _select(stages: Stages, score_meta: dict, config: RunConfig) -> dict:
    """Bands + k-center, unless the selection is current; writes selection.json and selected.json."""
    run, select = stages.run, config.select
    meta = {"config": select.recorded(), "input": digest(score_meta)}
    if stages.current("select", meta, layout.SELECTION, layout.SELECTED):
        log.info("select: up to date")
        return json.loads(run.file(layout.SELECTION).read_text())
    selection = select_dir(run.path, select)
    write_json(run.file(layout.SELECTED), selected_records(run.path, selection["selected_ids"]))
    stages.record("select", **meta, report=selection["report"])
    return selection
