"""A', the target model's own greedy answer to each instruction (Stage 2's generated response),
through the resumable per-record job log (`threeds.stages.joblog`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from threeds.config import GenerateConfig
from threeds.io.data import full_instruction
from threeds.model.backends import Backend, Reply
from threeds.stages.joblog import Job, Task, good_rows, make_tasks, run_job


def _generated_fields(reply: Reply) -> dict:
    """The log row's answer fields; `finish_reason` says whether A' was cut off ("length")."""
    if reply.error is not None:
        return {"generated_output": None, "error": reply.error}
    text = reply.text.strip()
    return {"generated_output": text, "error": None if text else "empty reply", "finish_reason": reply.finish}


GENERATE = Job("generate", _generated_fields)


def generate_tasks(records: Sequence[dict], backend: Backend, max_new_tokens: int) -> list[Task]:
    """The user turn of A' is the record's instruction (+ input): the prompt P of Stage 2."""
    return make_tasks(records, [full_instruction(r) for r in records], backend, max_new_tokens)


def generate_records(
    records: Sequence[dict], backend: Backend, log_path: Path, max_new_tokens: int = GenerateConfig.max_new_tokens,
    *, overwrite: bool = False, progress: bool = True, progress_path: Path | None = None,
) -> tuple[list[dict], dict]:  # fmt: skip
    """A' for every record into the log; returns (records that got one, in input order, summary).

    `generated_output` is put beside the original fields (replacing one the input may carry).
    """
    tasks = generate_tasks(records, backend, max_new_tokens)
    summary = run_job(GENERATE, tasks, backend, log_path, max_new_tokens, overwrite=overwrite, progress=progress,
                      progress_path=progress_path)  # fmt: skip
    rows = good_rows(log_path, tasks)
    out = [{**r, "generated_output": rows[r["id"]]["generated_output"]} for r in records if r["id"] in rows]
    return out, summary
