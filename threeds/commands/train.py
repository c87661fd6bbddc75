"""`threeds train`: LoRA fine-tuning of the run's target model on its selection, a preset or a list of ids."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from threeds.config import ModelConfig, TrainConfig, add_arguments, from_args
from threeds.errors import ThreedsError
from threeds.io.data import loads_bounded, read_text
from threeds.io.lock import locked
from threeds.model.files import model_label
from threeds.outcomes.arms import Arm, ArmSource
from threeds.rundir.progress import TerminalBar

log = logging.getLogger(__name__)

EPILOG = """\
The paper's settings are the defaults (LoRA r 8 on every linear layer, learning rate 5e-5, 1 epoch,
cutoff 1024, an effective batch of 64 = --batch-size 4 x --grad-accum 16). A small selection at
batch 64 is a handful of optimizer steps: 40 records are one step. CPU: float32; a GPU: bfloat16.
Several GPUs: `accelerate launch` does not apply to this loop; train with the LlamaFactory files
written to OUT/llamafactory/ (`FORCE_TORCHRUN=1 llamafactory-cli train OUT/llamafactory/train.yaml`).
A killed training resumes from its last checkpoint when the same command runs again.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="LoRA fine-tuning of the run's model on its selection (does the selection help?)",
        description="Fine-tune the run's target model with LoRA on the run's selection (default), a saved "
        "preset or a list of ids; prompt tokens are masked from the loss and the chat template is the model's.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--run", required=True, type=Path, help="run directory (its records and its selection)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the adapter, ids, loss log and config")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--preset", help="train on the selection saved as RUN/selections/NAME.json (default: the run's selection)")
    which.add_argument("--ids", type=Path, help="train on these ids, in this order: a JSON list (of ids or of records "
                       "with an id) or one id per line")  # fmt: skip
    parser.add_argument("--model", help="base model (default: the run's target model, from its manifest)")
    parser.add_argument("--template", choices=("qwen", "baichuan"), help="chat template preset (default: the run's)")
    parser.add_argument("--system", help="system prompt (default: the run's)")
    add_arguments(parser.add_argument_group("training"), TrainConfig)
    parser.set_defaults(func=main)


def read_ids(path: Path) -> list[str]:
    """Ids from a JSON list (strings or records with an `id`) or a text file with one id per line, read
    within the data reader's bounds (a FIFO or a device is refused, not waited on); an id given twice
    is refused (it would be trained on twice)."""
    text = read_text(path)
    try:
        value = loads_bounded(text)
    except json.JSONDecodeError:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return _unique(path, lines, "line")
    except ValueError as exc:  # nested past the bound
        raise ThreedsError(str(exc), path=path) from None
    if isinstance(value, dict) and isinstance(value.get("selected_ids"), list):
        value = value["selected_ids"]
    if not isinstance(value, list):
        raise ThreedsError("expected a JSON list of ids or of records with an id", path=path)
    ids = [str(v["id"]) if isinstance(v, dict) and "id" in v else v for v in value]
    bad = next((i for i, v in enumerate(ids) if not isinstance(v, str)), None)
    if bad is not None:
        raise ThreedsError("neither an id string nor a record with an id", path=path, where=f"item {bad + 1}")
    return _unique(path, ids, "item")


def _unique(path: Path, ids: list[str], unit: str) -> list[str]:
    first: dict[str, int] = {}
    for number, value in enumerate(ids, start=1):
        if value in first:
            raise ThreedsError(f"id {value!r} again (first at {unit} {first[value]}): each record is trained on once "
                               "per epoch", path=path, where=f"{unit} {number}")  # fmt: skip
        first[value] = number
    return ids


def main(args: argparse.Namespace) -> int:
    from threeds.outcomes.train import train_arm  # torch and transformers only when it trains: not for `threeds --help`

    config = from_args(TrainConfig, args)
    source = ArmSource(args.run)
    if args.ids is not None:
        ids = read_ids(args.ids)
    else:
        arm = Arm("train", f"preset:{args.preset}", "preset", args.preset) if args.preset else Arm("train", "current", "current")
        ids = source.ids(arm, config.seed)
    records = source.records_of(ids)
    run_model = source.model()
    spec = ModelConfig(model=args.model or run_model.model, template=args.template or run_model.template,
                       system=args.system if args.system is not None else run_model.system, dtype=config.dtype)  # fmt: skip
    meta = {"model": model_label(spec.model), "template": spec.template, "system": spec.system, "run": str(args.run),
            "source": str(args.ids) if args.ids else f"preset:{args.preset}" if args.preset else "current"}  # fmt: skip
    with locked(args.out):
        log.info("training on %d records of %s", len(records), args.run)
        bar = TerminalBar("train", "step")
        try:
            summary = train_arm(spec, records, config, args.out, meta, progress=bar).summary
        finally:
            bar.close()
    print(json.dumps({**summary, "out": str(args.out)}, indent=2))
    return 0
