"""`threeds generate`: the target model's own greedy answer A' for each record (`generated_output`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from threeds.backends import Backend, BackendError, LocalBackend, OpenAIBackend
from threeds.commands.score import add_data_arguments, add_engine_arguments, add_model_arguments
from threeds.data import DataError, read_records
from threeds.generate import StaleResultsError, generate_records, write_records
from threeds.rundir import RunError

log = logging.getLogger(__name__)

# What the stage commands turn into exit status 1 with a one-line message.
EXPECTED_ERRORS = (BackendError, DataError, StaleResultsError, RunError, OSError)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """--backend and its options (model flags included), shared by rate, generate and run."""
    add_model_arguments(parser)
    group = parser.add_argument_group("backend")
    group.add_argument(
        "--backend", choices=["local", "openai"], default="local",
        help="local = run --model in this process (transformers); openai = any OpenAI-compatible server "
        "(LlamaFactory `llamafactory-cli api`, `vllm serve`, llama.cpp server, Ollama) (default: local)",
    )  # fmt: skip
    group.add_argument("--batch-size", type=int, default=8, help="local: prompts generated together (default: 8)")
    group.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                       help="openai: the server's API root (default: http://127.0.0.1:8000/v1, where LlamaFactory and vLLM listen)")  # fmt: skip
    group.add_argument("--api-model", default=None,
                       help="openai: model name to request (default: the server's only model, from /v1/models)")  # fmt: skip
    group.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight at once (default: 8)")
    group.add_argument("--timeout", type=float, default=120.0, help="openai: seconds one attempt may take (default: 120)")
    group.add_argument("--retries", type=int, default=5,
                       help="openai: retries after a timeout, connection error, 429 or 5xx (default: 5)")  # fmt: skip
    group.add_argument("--retry-backoff", type=float, default=1.0,
                       help="openai: first retry delay in seconds, doubled each retry, with jitter (default: 1)")  # fmt: skip


def backend_from_args(args: argparse.Namespace) -> Backend:
    """The backend the flags ask for; the API key comes from THREEDS_API_KEY or OPENAI_API_KEY.

    `--backend local` with `--engine ray` (commands that have the flag) runs on the Ray cluster.
    """
    if not getattr(args, "verbose", False):
        for name in ("httpx", "httpx2"):  # one INFO line per request would bury the progress bar
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.backend == "local" and getattr(args, "engine", "local") == "ray":
        from threeds.engine_ray import RayLocalBackend

        return RayLocalBackend(args.model, template=args.template, system=args.system, batch_size=args.batch_size,
                               address=args.ray_address, workers=args.ray_workers, dtype=args.dtype)  # fmt: skip
    if args.backend == "local":
        return LocalBackend(args.model, template=args.template, system=args.system, batch_size=args.batch_size,
                            dtype=args.dtype)  # fmt: skip
    return OpenAIBackend(
        args.base_url, args.api_model, system=args.system, concurrency=args.concurrency, timeout=args.timeout,
        retries=args.retries, backoff=args.retry_backoff,
    )  # fmt: skip


def print_summary(summary: dict) -> None:
    """The counts, and where the failures are when there are any."""
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    if summary["failed"]:
        print(f"{summary['failed']} {summary['stage']} failures are in {summary['log']} (rows with an \"error\"); "
              "run the same command again to retry them")  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="the model's own greedy answer A' to each instruction (needed by `threeds score`)",
        description="Generate A', the target model's greedy answer to each record's instruction, and write the "
        "records with it as `generated_output` beside their original fields. Each answer is logged the "
        "moment it arrives; run the same command again to resume after an interruption or to retry failures.",
    )  # fmt: skip
    parser.add_argument("--data", required=True, type=Path, help="records: JSON, JSONL, Parquet or CSV")
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, type=Path,
                        help="records with generated_output: a JSON array, or JSON Lines if it ends in .jsonl")  # fmt: skip
    parser.add_argument("--log", type=Path, default=None,
                        help="per-record log used to resume (default: OUT's folder/<OUT name>.generations.jsonl)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer in tokens (default: 512)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo answers the log holds from another model, prompt or settings")  # fmt: skip
    add_backend_arguments(parser)
    engine = parser.add_argument_group(
        "engine",
        "where --backend local runs the model. With --engine ray, A' is generated by a Ray Data pipeline: "
        "--batch-size prompts per call to one of the model replicas, the same batches and the same greedy "
        "answers as in this process, each answer logged the moment its batch returns, into the same log "
        "(so either engine resumes the other's). --backend openai has its own server and takes no engine.",
    )  # fmt: skip
    add_engine_arguments(engine)
    parser.set_defaults(func=main)


RAY_OPENAI = ("--engine ray runs the model itself on a Ray cluster (--backend local); with --backend openai the "
              "server generates, so drop --engine ray (or use --backend local to generate on the cluster)")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    if args.engine == "ray" and args.backend != "local":
        log.error("%s", RAY_OPENAI)
        return 1
    log_path = args.log or args.out.with_name(f"{args.out.stem}.generations.jsonl")
    backend = None
    try:
        records, rejects = read_records(args.data, args.duplicate_ids)
        if rejects:
            log.warning("%d input records rejected, e.g. %s", len(rejects), rejects[0])
        backend = backend_from_args(args)
        done, summary = generate_records(records, backend, log_path, args.max_new_tokens, overwrite=args.overwrite)
        write_records(args.out, done)
    except EXPECTED_ERRORS as exc:
        log.error("%s", exc)
        return 1
    finally:
        if isinstance(backend, LocalBackend):
            backend.close()  # frees the model; a Ray backend also leaves the cluster it joined
    print_summary({**summary, "out": str(args.out)})
    return 0 if not summary["failed"] else 3
