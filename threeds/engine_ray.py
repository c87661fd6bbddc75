"""`threeds score --engine ray`: Stage-2 scoring as a Ray Data pipeline over a cluster.

Each pending chunk of records is one row (and block) of a Ray dataset; `map_batches` streams the
chunks through a pool of actors (`ChunkScorer`), each holding one model replica (one GPU per actor,
or one CPU where the cluster has no GPU) and scoring a chunk exactly as the single-process path
does. The driver takes results as they stream back, in whatever order they finish, and writes each
into the run directory as the same chunk files (`RunDir.write_chunk`): a killed run resumes from its
finished chunks with either engine, and worker nodes need no shared file system, only threeds and
the model. The records enter Ray's object store from the driver, which has read them all already.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from threeds.model import load_model, resolve_model
from threeds.rundir import RunDir, RunError

log = logging.getLogger(__name__)


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


class ChunkScorer:
    """A Ray Data actor: loads the model once, then scores one chunk per call.

    Results travel as Parquet / .npy bytes so that column types (NaN, booleans, float32) arrive
    exactly as the single-process path writes them.
    """

    def __init__(self, source: str, model_spec: str | None, settings: dict) -> None:
        from threeds.score import build_scorer, model_info

        model, tokenizer = load_model(source)
        self.scorer = build_scorer(model, tokenizer, **settings)
        self.info = json.dumps({"model": model_info(model, model_spec), "function_words": self.scorer.fw.describe()})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"chunk": [], "metrics": [], "embeddings": [], "tokens": [], "info": []}
        for index, records in zip(batch["chunk"], batch["records"]):
            result = self.scorer.score(json.loads(records))
            out["chunk"].append(int(index))
            out["metrics"].append(_parquet_bytes(result.metrics))
            out["embeddings"].append(_npy_bytes(result.embeddings))
            out["tokens"].append(_parquet_bytes(result.tokens))
            out["info"].append(self.info)
        return {name: np.array(values, dtype=np.int64 if name == "chunk" else object) for name, values in out.items()}


def _connect(address: str | None) -> bool:
    """Join the cluster at `address` (None: Ray's default, `RAY_ADDRESS` or a local cluster);
    True when this call started the connection, so the caller shuts it down again."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, log_to_driver=False)
    return True


def _model_source(model_spec: str | None) -> str:
    """Resolve the spec once on the driver (an embedded or .gguf model is converted here, not in
    every actor); a local path is made absolute because actors may run in another directory."""
    source = resolve_model(model_spec)
    return str(Path(source).resolve()) if Path(source).exists() else source


def score_chunks_ray(
    run: RunDir,
    chunks: list[list[dict]],
    pending: list[int],
    model_spec: str | None,
    settings: dict,
    *,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Score `pending` chunks on a Ray cluster into `run`; returns the timings (connect, score).

    `workers` model replicas (default: one per GPU in the cluster, else one per CPU).
    """
    try:
        import ray
    except ImportError as exc:
        raise RunError("--engine ray needs Ray: pip install 'ray[data]' (on every machine of the cluster)") from exc

    started = time.perf_counter()
    source = _model_source(model_spec)
    owned = _connect(address)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        replicas = workers or gpus or max(1, int(resources.get("CPU", 1)))
        run.update_manifest(engine={"name": "ray", "address": address, "workers": replicas, "gpus_per_worker": int(gpus > 0)})
        log.info("ray: %d model replicas on %s", replicas, "GPUs" if gpus else "CPUs")
        connect_seconds = time.perf_counter() - started
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        items = [{"chunk": i, "records": json.dumps(chunks[i], ensure_ascii=False)} for i in pending]
        results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ChunkScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=1,
            num_gpus=1 if gpus else 0,
            fn_constructor_kwargs={"source": source, "model_spec": model_spec, "settings": settings},
        )  # fmt: skip
        started = time.perf_counter()
        _write_results(run, chunks, pending, results.iter_rows(), progress)
        return {"load_seconds": connect_seconds, "score_seconds": time.perf_counter() - started}
    finally:
        if owned:
            ray.shutdown()


def _write_results(run: RunDir, chunks: list[list[dict]], pending: list[int], rows, progress: bool) -> None:
    """Write each chunk as it arrives; the first one also records the model in the manifest."""
    total = 2 * sum(len(chunks[i]) for i in pending)
    described = False
    with tqdm(total=total, unit="seq", desc="score (ray)", disable=not progress) as bar:
        for row in rows:
            index = int(row["chunk"])
            metrics = pd.read_parquet(io.BytesIO(row["metrics"]))
            embeddings = np.load(io.BytesIO(row["embeddings"]), allow_pickle=False)
            run.write_chunk(index, metrics, embeddings, pd.read_parquet(io.BytesIO(row["tokens"])))
            if not described:
                info = json.loads(row["info"])
                run.update_manifest(model=info["model"], function_words=info["function_words"])
                described = True
            bar.update(2 * len(chunks[index]))
            run.write_progress("score", bar.n, total)
