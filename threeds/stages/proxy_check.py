"""`threeds proxy-check`: score a target run's records with a proxy model and say whether it would pick
what the target picks (issue 33).

The proxy goes through the same stages as any run, into a run directory of its own (OUT):
with `answers="target"` it scores the target's records as they are, A' included (`score_run`);
with `answers="proxy"` it first generates its own A' (`generate_records`, logged in
OUT/generations.jsonl, resumable), which is what a proxy-only run of the pool would do. The
scoring settings (max length, function words, template, system prompt, chunk size) are the target
run's, so only the model differs. Then `threeds.selection.proxy_agreement` compares the two and
OUT/proxy_check.json records the numbers, the timings and the verdict. OUT stays a scored run:
`threeds select`, the app and Compare open it like any other.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from threeds.config import BackendConfig, EngineConfig, GenerateConfig, ModelConfig, RunConfig, ScoreConfig, SelectConfig
from threeds.errors import SettingsError, ThreedsError
from threeds.io.data import write_json
from threeds.io.lock import locked
from threeds.model.backends import LocalBackend
from threeds.rundir import layout
from threeds.rundir.check import load_scored, read_json_object, read_manifest, read_scored_records, stage_part
from threeds.rundir.read import Run, run_settings
from threeds.rundir.write import RunDir
from threeds.selection.proxy_agreement import Gates, Side, compare, scaled_k, verdict
from threeds.stages.generate import generate_records
from threeds.stages.pipeline import Stages, make_backend, score_run

log = logging.getLogger(__name__)

ANSWERS = ("target", "proxy")
CHECK_VERSION = 1


class ProxyCheckError(ThreedsError):
    """The check cannot be made with these inputs: one line naming the run, file or flag."""


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    """What `threeds proxy-check` was asked (its flags)."""

    proxy: str
    answers: str = "target"
    pool_size: int | None = None
    sample_num: int | None = None
    gates: Gates = Gates()
    dtype: str = "auto"
    batch_tokens: int = ScoreConfig.batch_tokens
    batch_size: int = BackendConfig.batch_size
    max_new_tokens: int | None = None


def target_settings(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """The target run's manifest, its scored records (data.jsonl) and its scores' settings; a run that
    is not scored is refused in one line."""
    metrics, _ = load_scored(run_dir)
    manifest = read_manifest(run_dir / layout.MANIFEST) if (run_dir / layout.MANIFEST).is_file() else {}
    if manifest.get("status") != "scored" or not isinstance(manifest.get("score_config"), dict):
        raise ProxyCheckError(f"{run_dir}: not a finished scored run (manifest status {manifest.get('status')!r}); "
                              "finish `threeds run` or `threeds score` into it first")  # fmt: skip
    records = read_scored_records(run_dir, metrics["id"].tolist()).take(range(len(metrics)))  # a sample: small
    return manifest, records, manifest["score_config"]


def proxy_specs(recorded: dict, check: CheckConfig) -> tuple[ScoreConfig, ModelConfig]:
    """The target's scoring settings with the proxy as the model."""
    score = ScoreConfig(max_length=recorded.get("max_length", ScoreConfig.max_length),
                        function_words=recorded.get("function_words", ScoreConfig.function_words),
                        chunk_size=recorded.get("chunk_size", ScoreConfig.chunk_size), batch_tokens=check.batch_tokens)  # fmt: skip
    spec = ModelConfig(model=check.proxy, template=recorded.get("template"), system=recorded.get("system"), dtype=check.dtype)
    return score, spec


def proxy_answers(records: list[dict], out: Path, spec: ModelConfig, check: CheckConfig, tokens: int) -> tuple[list[dict], dict]:
    """The proxy's own A' for every record (resumable log in OUT); the model is freed afterwards."""
    backend = make_backend(RunConfig(model=spec, backend=BackendConfig(batch_size=check.batch_size)))
    try:
        done, summary = generate_records(records, backend, out / layout.GENERATIONS, tokens, overwrite=True,
                                         progress_path=out / layout.PROGRESS)  # fmt: skip
    finally:
        if isinstance(backend, LocalBackend):
            backend.close()
    if not done:
        raise ProxyCheckError(f"the proxy generated no A'; see the errors in {out / layout.GENERATIONS}")
    return done, summary


def per_record(manifest: dict, n: int) -> dict:
    """Seconds per record of a run's scoring and A' generation, from its manifest (None where unknown)."""
    score = (manifest.get("timings") or {}).get("score_seconds")
    summary = stage_part(manifest, "generate", "summary")
    generate = summary["seconds"] / summary["new"] if summary.get("new") and summary.get("seconds") else None
    return {"score": score / n if score and n else None, "generate": generate}


def timing(target: dict, proxy: dict, pool: int | None, n: int) -> dict:
    """Per record and projected for the pool (or the sample when the pool's size is not given)."""
    records = pool or n
    total = {side: sum(v for v in times.values() if v is not None) for side, times in (("target", target), ("proxy", proxy))}
    ratio = target["score"] / proxy["score"] if target["score"] and proxy["score"] else None
    return {
        "target_per_record": target, "proxy_per_record": proxy, "score_speedup": ratio, "projected_records": records,
        "projected_seconds": {side: total[side] * records if total[side] else None for side in total},
    }  # fmt: skip


def run_check(target_dir: str | os.PathLike, out: str | os.PathLike, check: CheckConfig, overwrite: bool = False) -> dict:
    """Score the target run's records with the proxy into `out`, compare, write and return proxy_check.json's content."""
    target_dir, out = Path(target_dir), Path(out)
    if check.answers not in ANSWERS:
        raise SettingsError(f"--answers {check.answers}: must be one of {', '.join(ANSWERS)}")
    if out.resolve() == target_dir.resolve():
        raise SettingsError(f"--out {out}: the target run itself; the proxy's scores need a directory of their own")
    manifest, records, recorded = target_settings(target_dir)
    score, spec = proxy_specs(recorded, check)
    with locked(out):
        generated = None
        if check.answers == "proxy":
            tokens = check.max_new_tokens or stage_part(manifest, "generate", "config").get("max_new_tokens", GenerateConfig.max_new_tokens)
            records, generated = proxy_answers(records, out, spec, check, tokens)
        started = time.perf_counter()
        score_run(records, out, score, spec, EngineConfig(), data_path=str(target_dir / layout.DATA), overwrite=overwrite)
        if generated is not None:
            Stages(RunDir(out)).record("generate", config={"max_new_tokens": tokens}, summary=generated)
        result = check_scored(target_dir, out, check)
        result["seconds"] = round(time.perf_counter() - started, 3)
        write_json(out / layout.PROXY_CHECK, result)
    return result


def check_scored(target_dir: Path, proxy_dir: Path, check: CheckConfig) -> dict:
    """The check of two scored runs over the same records: agreement, verdict and timings (proxy_check.json)."""
    manifest = read_manifest(target_dir / layout.MANIFEST) if (target_dir / layout.MANIFEST).is_file() else {}
    proxy_manifest = read_manifest(proxy_dir / layout.MANIFEST) if (proxy_dir / layout.MANIFEST).is_file() else {}
    result = _compare(target_dir, proxy_dir, manifest, check)
    n = result["agreement"]["n"]
    result["timing"] = timing(per_record(manifest, result["target"]["n_scored"]), per_record(proxy_manifest, result["proxy"]["n_scored"]),
                              check.pool_size, n)  # fmt: skip
    result["proxy"]["model_info"] = proxy_manifest.get("model")
    return result


def _compare(target_dir: Path, out: Path, manifest: dict, check: CheckConfig) -> dict:
    """The agreement of the two scorings on the records both have, and the verdict."""
    (t_metrics, t_emb), (p_metrics, p_emb) = load_scored(target_dir), load_scored(out)
    shared = [i for i in t_metrics["id"] if i in set(p_metrics["id"])]
    t_rows, p_rows = (_rows(m, shared) for m in (t_metrics, p_metrics))
    target = Side(t_metrics.iloc[t_rows].reset_index(drop=True), np.asarray(t_emb[t_rows], dtype=np.float32))
    proxy = Side(p_metrics.iloc[p_rows].reset_index(drop=True), np.asarray(p_emb[p_rows], dtype=np.float32))
    settings = run_settings_of(target_dir, manifest)
    k = min(check.sample_num, len(shared)) if check.sample_num else scaled_k(settings.sample_num, len(shared), check.pool_size)
    records = read_scored_records(target_dir, t_metrics["id"].tolist()).take(t_rows)
    sources = [str(record.get("source", "(none)")) for record in records]
    agreement = compare(target, proxy, settings, k, sources)
    target_model = (manifest.get("model") or {}).get("spec") or (manifest.get("score_config") or {}).get("model")
    return {
        "version": CHECK_VERSION, "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target": {"run": str(target_dir.resolve()), "model": target_model, "n_scored": len(t_metrics)},
        "proxy": {"run": str(out.resolve()), "model": check.proxy, "answers": check.answers, "n_scored": len(p_metrics)},
        "pool_size": check.pool_size, "sample_num": settings.sample_num, "agreement": agreement,
        "verdict": verdict(agreement, check.gates),
    }  # fmt: skip


def run_settings_of(run_dir: Path, manifest: dict) -> SelectConfig:
    """The target run's own bands, attention method, sample_num and seed (where the app starts too)."""
    path = run_dir / layout.SELECTION
    found = run_settings(Run(run_dir, manifest=manifest, selection=read_json_object(path) if path.is_file() else None))
    bands = found.get("bands") or SelectConfig().bands()
    rest = {key: found[key] for key in ("sample_num", "atten_method", "seed") if key in found}
    return SelectConfig.from_bands(bands, **rest)


def _rows(metrics, ids: list[str]) -> np.ndarray:
    where = {sample_id: row for row, sample_id in enumerate(metrics["id"])}
    return np.array([where[i] for i in ids], dtype=np.int64)
