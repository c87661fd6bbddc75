"""Where Stage-2 scoring runs: the interface of both engines, `threeds.stages.score.LocalEngine` (this
process) and `threeds.stages.engine_ray.RayEngine` (a Ray cluster), so the one chunk writer
(`threeds.stages.pipeline.score_chunks`) drives either. It is to scoring what
`threeds.model.backends.Backend` is to rating and A'."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # score.py imports torch and transformers; a command that does not score never loads them
    from threeds.stages.score import ScoredChunk


@runtime_checkable
class Engine(Protocol):
    def start(self) -> dict:
        """Get ready (load the model, join the cluster); returns manifest fields naming the model, or {}."""

    def results(
        self, chunks: Sequence[list[dict]], pending: Sequence[int], progress: Callable[[int], None]
    ) -> Iterator[ScoredChunk]:
        """The results of the `pending` chunks as each finishes; `progress(n)` after every n sequences scored."""

    def close(self) -> None:
        """Free the model or leave the cluster; called once, after an error too."""
