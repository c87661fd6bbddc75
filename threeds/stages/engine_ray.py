"""`--engine ray`: Stage-2 scoring and local-backend generation as Ray Data pipelines over a cluster.

Both stream units of work through one pool of actors (`_stream`), each actor holding one model
replica (one GPU per actor, or one CPU where the cluster has no GPU). The driver joins the cluster
(`_connect`), resolves the model once (`_model_source`), and writes each result the moment it
streams back, in whatever order results finish. Worker nodes need no shared file system, only
threeds and the model; the records enter Ray's object store from the driver, which has read them.

Scoring (`RayEngine`): each pending chunk of records is one row (and block) of a Ray dataset,
scored by a `ChunkScorer` exactly as the single-process path does and written into the run
directory by the caller as the same chunk files (`RunDir.write_chunk`): a killed run resumes from its finished
chunks with either engine.

Generation (`RayLocalBackend`): a `LocalBackend` whose `chat` sends each generation batch (the same
batches, longest prompts first, that the single-process backend forms, so the greedy answers are
the same) to a `BatchGenerator`. Replies reach `on_reply` as each batch returns, so
`threeds.stages.generate` appends and fsyncs their log rows just as in one process: the log, its keys and
its resume are shared, a kill loses only the batches in flight, and either engine finishes a log
the other started.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from threeds.config import EngineConfig, ModelConfig, ScoreConfig
from threeds.model.backends import LocalBackend, OnReply, Reply, length_batches
from threeds.model.load import load_model, load_tokenizer, resolve_model
from threeds.rundir.write import RunError
from threeds.stages.score import ChunkResult, ScoredChunk, build_scorer, model_info

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

    def __init__(self, source: str, score: dict, spec: dict) -> None:
        """`score`, `spec`: the run's ScoreConfig and ModelConfig as dicts (they travel to the actor)."""
        score_config, model_config = ScoreConfig(**score), ModelConfig(**spec)
        model, tokenizer = load_model(source, dtype=model_config.load_dtype)
        self.scorer = build_scorer(model, tokenizer, score_config, model_config)
        self.info = json.dumps({"model": model_info(model, model_config.model), "function_words": self.scorer.fw.describe()})

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


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RunError("--engine ray needs Ray: pip install 'ray[data]' (on every machine of the cluster)") from exc
    return ray


WORKER_NICENESS = "0"  # of a local cluster's workers that threeds starts (Ray's default: 15)


def _connect(address: str | None) -> bool:
    """Join the cluster at `address` (None: Ray's default, `RAY_ADDRESS` or a local cluster);
    True when this call started the connection, so the caller shuts it down again. A local cluster
    that this call may start runs its workers at the driver's priority unless RAY_worker_niceness
    says otherwise: they do the scoring while the driver waits, and at Ray's niceness 15 beside
    other work on the machine they crawled (the model actors of a test run beside four busy loops
    were still importing torch after 25 minutes)."""
    import ray

    if ray.is_initialized():
        return False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_worker_niceness", WORKER_NICENESS)  # read by the raylet that init starts
    ray.init(address=address, log_to_driver=False)
    return True


def _model_source(model_spec: str | None) -> str:
    """Resolve the spec once on the driver (an embedded or .gguf model is converted here, not in
    every actor); a local path is made absolute because actors may run in another directory."""
    source = resolve_model(model_spec)
    return str(Path(source).resolve()) if Path(source).exists() else source


def _replicas(workers: int | None, units: int) -> tuple[int, int]:
    """(model replicas, GPUs in the cluster): `workers`, else one per GPU, else one per CPU; never
    more than the `units` of work there are (an idle replica would only load the model)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    replicas = max(1, min(workers or gpus or int(resources.get("CPU", 1)), units))
    log.info("ray: %d model replicas on %s", replicas, "GPUs" if gpus else "CPUs")
    return replicas, gpus


def _stream(actor: type, kwargs: dict, items: list[dict], replicas: int, gpus: int):
    """Rows of `actor(**kwargs)(row)` for every item, one item per call, through a pool of `replicas`
    actors (one GPU each when the cluster has GPUs, else one CPU), in the order they finish."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows its own bar
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        actor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=1,
        num_gpus=1 if gpus else 0, fn_constructor_kwargs=kwargs,
    ).iter_rows()  # fmt: skip


class RayEngine:
    """Scores chunks on a Ray cluster (`--engine ray`), one model replica per GPU (or CPU); the same
    interface as `threeds.stages.score.LocalEngine`, so the caller writes either's chunks the same way."""

    def __init__(self, score: ScoreConfig, spec: ModelConfig, engine: EngineConfig) -> None:
        self.score, self.spec, self.engine = score, spec, engine
        self.owned = False

    def start(self) -> dict:
        """Join the cluster; the model is described by the first chunk that comes back."""
        _import_ray()
        self.source = _model_source(self.spec.model)
        self.owned = _connect(self.engine.ray_address)
        return {}

    def results(
        self, chunks: Sequence[list[dict]], pending: Sequence[int], progress: Callable[[int], None]
    ) -> Iterator[ScoredChunk]:
        replicas, gpus = _replicas(self.engine.ray_workers, len(pending))
        engine = {"name": "ray", "address": self.engine.ray_address, "workers": replicas, "gpus_per_worker": int(gpus > 0)}
        items = [{"chunk": i, "records": json.dumps(chunks[i], ensure_ascii=False)} for i in pending]
        kwargs = {"source": self.source, "score": asdict(self.score), "spec": asdict(self.spec)}
        for row in _stream(ChunkScorer, kwargs, items, replicas, gpus):
            index = int(row["chunk"])
            result = ChunkResult(
                metrics=pd.read_parquet(io.BytesIO(row["metrics"])),
                embeddings=np.load(io.BytesIO(row["embeddings"]), allow_pickle=False),
                tokens=pd.read_parquet(io.BytesIO(row["tokens"])),
            )  # fmt: skip
            progress(2 * len(chunks[index]))
            yield ScoredChunk(index, result, info={**json.loads(row["info"]), "engine": engine})

    def close(self) -> None:
        if self.owned:
            import ray

            ray.shutdown()
            self.owned = False


# ------------------------------------------------------------------------------------- generation


class BatchGenerator:
    """A Ray Data actor: loads the model once, then answers one generation batch per call with the
    single-process `LocalBackend` (same templating, stop markers and greedy decoding)."""

    def __init__(
        self, source: str, template: str | None, system: str | None, batch_size: int, max_new_tokens: int,
        dtype: str | None,
    ) -> None:  # fmt: skip
        self.backend = LocalBackend(source, template=template, system=system, batch_size=batch_size, dtype=dtype)
        self.backend.load()
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        replies = [
            json.dumps([[r.text, r.seconds, r.finish] for r in self.backend.chat(json.loads(prompts), self.max_new_tokens)])
            for prompts in batch["prompts"]
        ]  # fmt: skip
        return {"batch": np.asarray(batch["batch"], dtype=np.int64), "replies": np.array(replies, dtype=object)}


class RayLocalBackend(LocalBackend):
    """`--backend local --engine ray`: the local backend's generation on a Ray cluster.

    Same `name`, `label` and `signature` as `LocalBackend`, so its log rows (and their keys) are the
    single-process ones. The driver loads only the tokenizer, to form the batches; the cluster is
    joined on the first `chat` and left by `close()` when this backend started the connection.
    `workers` model replicas (default: one per GPU in the cluster, else one per CPU).
    """

    def __init__(
        self, model_spec: str | None = None, *, template: str | None = None, system: str | None = None,
        batch_size: int = 8, address: str | None = None, workers: int | None = None, dtype: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(model_spec, template=template, system=system, batch_size=batch_size, dtype=dtype)
        self.address, self.workers = address, workers
        self._source: str | None = None
        self._owned = False

    def _batches(self, prompts: Sequence[str]) -> list[list[int]]:
        """Indices of `prompts` per generation batch, as `LocalBackend.chat` groups them: by
        templated token length, longest first, `batch_size` at a time."""
        from threeds.model.prompts import prompt_format

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self._source)
        fmt = prompt_format(self.tokenizer, self.template, self.system)
        lengths = [len(self.tokenizer(fmt.prompt(p), add_special_tokens=False)["input_ids"]) for p in prompts]
        return length_batches(lengths, self.batch_size)

    def chat(self, prompts: Sequence[str], max_new_tokens: int, on_reply: OnReply | None = None) -> list[Reply]:
        if not prompts:
            return []
        _import_ray()
        if self._source is None:
            self._source = _model_source(self.model_spec)
        batches = self._batches(prompts)
        if not self._owned:
            self._owned = _connect(self.address)
        replicas, gpus = _replicas(self.workers, len(batches))
        items = [{"batch": b, "prompts": json.dumps([prompts[i] for i in batch], ensure_ascii=False)}
                 for b, batch in enumerate(batches)]  # fmt: skip
        kwargs = {"source": self._source, "template": self.template, "system": self.system,
                  "batch_size": self.batch_size, "max_new_tokens": max_new_tokens, "dtype": self.dtype}  # fmt: skip
        replies: list[Reply | None] = [None] * len(prompts)
        for row in _stream(BatchGenerator, kwargs, items, replicas, gpus):
            for i, (text, seconds, finish) in zip(batches[int(row["batch"])], json.loads(row["replies"])):
                replies[i] = Reply(text, seconds, model=self.label, finish=finish)
                if on_reply:
                    on_reply(i, replies[i])
        return replies

    def close(self) -> None:
        """Leave the cluster if this backend joined it (a local cluster it started stops)."""
        super().close()
        if self._owned:
            import ray

            ray.shutdown()
            self._owned = False
