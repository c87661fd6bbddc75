"""A run directory (`cache/<run>/`): manifest, resumable chunks, consolidated stage outputs.

Scoring writes one chunk of samples at a time into `chunks/`, each file atomically (temp file +
rename) and the chunk's metrics file last, so a chunk counts as done only when all of it is on disk.
A killed run started again skips finished chunks: no row is lost or duplicated.

Consolidation is safe to kill at any step: the joined outputs are written first (each atomically),
then the manifest's `status: scored`, the completion marker, and only then are the chunks removed.
A rerun that finds the marker only finishes the cleanup; one that does not joins the chunks again.
Temporary files a kill left behind are removed when the run's writer starts (`remove_stale_temps`).
"""

from __future__ import annotations

import os
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd

from threeds.errors import ThreedsError
from threeds.io.atomic import atomic_write, remove_temps
from threeds.io.data import write_json, write_jsonl
from threeds.rundir import layout
from threeds.rundir.check import read_manifest
from threeds.rundir.record_index import open_records
from threeds.rundir.sources import keep_sources, source_codes

CHUNK_PARTS = (layout.TOKENS, layout.CHUNK_EMBEDDINGS, layout.METRICS)  # in the order written: metrics last
# Files the run's writer replaces atomically (the app's caches beside them are not its own; data.jsonl's
# row index, sources and A' checks are both: Stage 2 writes them, a reader that finds them stale writes them again).
WRITER_FILES = (layout.MANIFEST, layout.PROGRESS, layout.STATUS, layout.REJECTS, layout.SELECTION, layout.SELECTED,
                *layout.SCORE_OUTPUTS, *layout.DATA_INDEX, *layout.SOURCES, *layout.REPEAT_SHARES)  # fmt: skip
PACKAGES = ("threeds", "torch", "transformers", "numpy", "pandas", "pyarrow", "spacy", "jieba")


class RunError(ThreedsError, RuntimeError):
    """The run directory cannot be used as asked; the message says why and what to do."""


def write_progress(path: Path, stage: str, done: int, total: int) -> None:
    """progress.json: the stage running now and its counts, which the app polls."""
    write_json(path, {"stage": stage, "done": done, "total": total, "updated": time.time()})


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


class RunDir:
    """Paths and chunk bookkeeping of one run directory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.chunks = self.path / layout.CHUNKS

    def file(self, name: str) -> Path:
        return self.path / name

    def read_manifest(self) -> dict:
        path = self.file(layout.MANIFEST)
        if not path.exists():
            return {}
        return read_manifest(path)  # a corrupt one or one of the wrong shape: RunFileError naming it

    def update_manifest(self, **fields: object) -> dict:
        manifest = self.read_manifest() | fields
        write_json(self.file(layout.MANIFEST), manifest)
        return manifest

    def write_progress(self, stage: str, done: int, total: int) -> None:
        write_progress(self.file(layout.PROGRESS), stage, done, total)

    def _chunk(self, index: int, kind: str) -> Path:
        return self.chunks / f"{index:06d}.{kind}"

    def done_chunks(self) -> set[int]:
        """Chunks with every part on disk (the metrics file is written last, but a run killed while an
        older threeds removed `chunks/` may have left it without the others: such a chunk is redone)."""
        if not self.chunks.exists():
            return set()
        found = {int(p.name.split(".")[0]) for p in self.chunks.glob(f"*.{layout.METRICS}")}
        return {i for i in found if all(self._chunk(i, part).is_file() for part in CHUNK_PARTS)}

    def write_chunk(self, index: int, metrics: pd.DataFrame, embeddings: np.ndarray, tokens: pd.DataFrame) -> None:
        atomic_write(self._chunk(index, layout.TOKENS), lambda f: tokens.to_parquet(f, index=False))
        atomic_write(self._chunk(index, layout.CHUNK_EMBEDDINGS), lambda f: _save_npy(f, embeddings))
        atomic_write(self._chunk(index, layout.METRICS), lambda f: metrics.to_parquet(f, index=False))

    def remove_chunks(self) -> None:
        """Remove `chunks/`; only once the completion marker is written, and safe to repeat after a kill."""
        shutil.rmtree(self.chunks, ignore_errors=True)

    def remove_stale_temps(self) -> list[Path]:
        """Temporary files a killed writer left (its own files' and every chunk's); the caller holds the lock."""
        return remove_temps(self.path, WRITER_FILES) + remove_temps(self.chunks)

    def consolidate(self, n_chunks: int, records: list[dict], embeddings_dtype: str = "float32") -> pd.DataFrame:
        """Join the chunks in order into data.jsonl, embeddings.npy (in `embeddings_dtype`, a chunk at a
        time), tokens.parquet and metrics.parquet (last); the chunks stay until the caller has written
        the completion marker."""
        missing = sorted(set(range(n_chunks)) - self.done_chunks())
        if missing:
            raise RunError(f"{self.chunks}: chunks {missing[:5]} are missing; run the same command again")
        metrics = pd.concat([pd.read_parquet(self._chunk(i, layout.METRICS)) for i in range(n_chunks)], ignore_index=True)
        parts = [self._chunk(i, layout.CHUNK_EMBEDDINGS) for i in range(n_chunks)]
        tokens = pd.concat([pd.read_parquet(self._chunk(i, layout.TOKENS)) for i in range(n_chunks)], ignore_index=True)
        ids = list(metrics["id"])
        if ids != [r["id"] for r in records]:
            raise RunError(f"{self.chunks}: chunks do not match the input records; delete the run and score again")
        write_jsonl(self.file(layout.DATA), records)
        self._index_records(ids, records)
        atomic_write(self.file(layout.EMBEDDINGS), lambda f: _join_npy(f, parts, np.dtype(embeddings_dtype)))
        atomic_write(self.file(layout.TOKENS), lambda f: tokens.to_parquet(f, index=False))
        atomic_write(self.file(layout.METRICS), lambda f: metrics.to_parquet(f, index=False))
        return metrics

    def _index_records(self, ids: list, records: list[dict]) -> None:
        """data.jsonl's row index and its records' sources, made now while they are at hand, so that
        the first open of a large run (the app, `threeds select`) reads 8 + 4 bytes a row instead of
        parsing every record. Ids that are not strings make a run the readers refuse: nothing to index then."""
        if all(isinstance(i, str) for i in ids):
            keep_sources(self.path, open_records(self.file(layout.DATA), ids, self.path), *source_codes(records))

    def clear_scores(self) -> None:
        """Forget earlier scoring output (used with --overwrite or a changed config)."""
        self.remove_chunks()
        for name in (*reversed(layout.SCORE_OUTPUTS), layout.SELECTION):  # metrics first: no longer "scored" to a reader
            self.file(name).unlink(missing_ok=True)


def _join_npy(fh, parts: list[Path], dtype: np.dtype) -> None:
    """The chunks' rows as one .npy of `dtype`, written a chunk at a time (never the whole array in memory)."""
    shapes = [np.load(p, mmap_mode="r", allow_pickle=False).shape for p in parts]
    n, dim = sum(s[0] for s in shapes), (shapes[0][1] if shapes else 0)
    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, dim)})
    for part in parts:
        fh.write(np.ascontiguousarray(np.load(part, allow_pickle=False), dtype=dtype).tobytes())


def _save_npy(fh, array: np.ndarray) -> None:
    np.save(fh, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)

