"""LoRA fine-tuning of the target model on a list of records: `threeds train` and every arm of an experiment.

A plain torch loop (HF's Trainer pickles its state): each record is templated with the model's chat
template as `P + R + E` (`threeds.stages.score.encode`, the same tokens Stage 2 scored), cut at
`cutoff` tokens, and only the response tokens `R + E` count in the loss. The loss of an optimizer
step is the mean over every response token of its batch_size x grad_accum records, so it does not
depend on how the step is split into forward passes.

Deterministic for a seed: the seed sets the LoRA initialisation and the order of the records, drawn
up front for every epoch. A checkpoint every `save_steps` steps holds the LoRA weights, AdamW's
state and the torch RNG as safetensors (no pickle), and a killed training resumes from it with the
same numbers it would have had. Output directory:

- `adapter_model.safetensors`, `adapter_config.json`: the adapter, as PEFT saves it (loads with
  `PeftModel.from_pretrained`, vLLM's `--lora-modules`, LlamaFactory's `adapter_name_or_path`);
- `ids.json`: the seed, the ids given and the order of the first epoch (each later epoch reshuffles
  from the same seeded stream: `StepPlan`);
- `train_config.json`: the settings, the model and the package versions; `train.json`: the summary;
- `loss.jsonl`: one row per optimizer step (step, epoch, loss, lr, tokens);
- `llamafactory/`: the records, `dataset_info.json` and a training YAML for LlamaFactory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from threeds.config import ModelConfig, TrainConfig, check_settings
from threeds.errors import ThreedsError
from threeds.io.atomic import atomic_write, follow_umask
from threeds.io.data import (
    append_jsonl,
    full_instruction,
    read_jsonl,
    write_json,
    write_jsonl,
)
from threeds.model.load import load_model, resolve_model
from threeds.model.lora import ADAPTER_WEIGHTS, add_lora
from threeds.model.prompts import PromptFormat, prompt_format
from threeds.rundir import layout
from threeds.rundir.progress import Progress
from threeds.rundir.write import package_versions
from threeds.stages.score import encode
from threeds.views.export import dataset_info_entry, export_text

log = logging.getLogger(__name__)

IGNORE = -100


class TrainError(ThreedsError, ValueError):
    """A training that cannot start or resume: one line naming the directory or setting."""


@dataclass(frozen=True)
class Example:
    """One record tokenised: `P + R + E`; the first `n_prompt` tokens are not learnt."""

    id: str
    ids: list[int]
    n_prompt: int

    @property
    def n_targets(self) -> int:
        return len(self.ids) - self.n_prompt


def encode_examples(records: Sequence[dict], tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, cutoff: int) -> list[Example]:
    """Every record as the chat template renders it, cut at `cutoff` tokens on the right."""
    eot = fmt.end_of_turn
    found = []
    for rec in records:
        enc = encode(tokenizer, fmt.prompt(full_instruction(rec)), rec["output"], eot, cutoff)
        found.append(Example(str(rec["id"]), enc.ids, max(enc.n_prompt, 1)))
    return found


# ------------------------------------------------------------------------------ the plan


class StepPlan(Sequence[list[int]]):
    """Record indices of every optimizer step: each epoch a shuffle drawn from the seed, cut into
    steps of batch_size x grad_accum (an epoch's last step may be smaller). Drawn an epoch at a
    time as the steps are asked for, so `--epochs 3000000` costs one epoch's memory, not all of them."""

    def __init__(self, n: int, config: TrainConfig) -> None:
        self.n, self.seed, self.epochs = n, config.seed, config.epochs
        self.per_step = config.batch_size * config.grad_accum
        self.per_epoch = math.ceil(n / self.per_step)
        self._rng, self._epoch, self._order = random.Random(self.seed), -1, list(range(n))

    def __len__(self) -> int:
        return self.epochs * self.per_epoch

    def __getitem__(self, step: int) -> list[int]:  # type: ignore[override]
        if not 0 <= step < len(self):
            raise IndexError(step)
        epoch, part = divmod(step, self.per_epoch)
        if epoch < self._epoch:  # a step behind the one drawn: the stream again from the seed
            self._rng, self._epoch = random.Random(self.seed), -1
        while self._epoch < epoch:
            self._order = list(range(self.n))
            self._rng.shuffle(self._order)
            self._epoch += 1
        return self._order[part * self.per_step : (part + 1) * self.per_step]

    def first_epoch(self) -> list[int]:
        """The order of the first epoch's records (ids.json records it)."""
        return [i for step in range(min(self.per_epoch, len(self))) for i in self[step]]


def step_plan(n: int, config: TrainConfig) -> StepPlan:
    """The plan of `n` records' optimizer steps under `config` (`StepPlan`)."""
    return StepPlan(n, config)


def learning_rate(step: int, total: int, config: TrainConfig) -> float:
    """The rate of optimizer step `step` (0-based) of `total`: linear warmup, then cosine or constant
    (transformers' `get_cosine_schedule_with_warmup`, LlamaFactory's default)."""
    warmup = math.ceil(config.warmup_ratio * total)
    if step < warmup:
        return config.lr * step / warmup
    if config.scheduler == "constant":
        return config.lr
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------ the loss


def batch_nll(model: PreTrainedModel, batch: Sequence[Example], pad_id: int, device: torch.device) -> torch.Tensor:
    """Summed negative log-likelihood of the response tokens of `batch` (prompt and padding masked).

    Logits are computed only from the first position that predicts a response token on (the
    model's `logits_to_keep`), which spares the prompt's [tokens x vocabulary] logits."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    target = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(batch):
        ids[row, : len(ex.ids)] = torch.tensor(ex.ids)
        mask[row, : len(ex.ids)] = 1
        target[row, ex.n_prompt - 1 : len(ex.ids) - 1] = ids[row, ex.n_prompt : len(ex.ids)]  # t-1 predicts t
    keep = torch.arange(min(e.n_prompt for e in batch) - 1, width - 1)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device)).logits
    picked = target[:, keep].to(device)
    return F.cross_entropy(logits.float().flatten(0, 1), picked.flatten(), ignore_index=IGNORE, reduction="sum")


def run_step(model: PreTrainedModel, examples: Sequence[Example], config: TrainConfig, pad_id: int, device: torch.device) -> tuple[float, int]:
    """Forward and backward of one optimizer step's records in batches; (mean loss per token, tokens)."""
    tokens = sum(e.n_targets for e in examples)
    total = 0.0
    for start in range(0, len(examples), config.batch_size):
        nll = batch_nll(model, examples[start : start + config.batch_size], pad_id, device)
        if tokens:
            (nll / tokens).backward()
        total += float(nll.detach())
    return (total / tokens if tokens else float("nan")), tokens


# ------------------------------------------------------------------------------ model and optimizer


def trainable(model: PreTrainedModel) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model: PreTrainedModel, config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(trainable(model).values()), lr=config.lr, weight_decay=config.weight_decay, foreach=False)


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(out: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Write checkpoint-STEP/ whole, then point checkpoint.json at it, then drop older ones: a kill at
    any moment leaves the last complete checkpoint in use."""
    final, tmp = out / f"{layout.CHECKPOINT_PREFIX}{step}", out / f"{layout.CHECKPOINT_PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:  # through atomic_write: a full disk names the file (safetensors' own writer says "IoError(...)"), modes follow the umask
        weights = {k: v.detach().contiguous().cpu() for k, v in trainable(model).items()}
        atomic_write(tmp / layout.CHECKPOINT_ADAPTER, lambda f: f.write(save(weights)))
        state = {f"{index}.{key}": value.cpu() for index, slots in optimizer.state_dict()["state"].items() for key, value in slots.items()}
        atomic_write(tmp / layout.CHECKPOINT_OPTIMIZER, lambda f: f.write(save({**state, "torch_rng": torch.get_rng_state()})))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the last complete checkpoint stays in use
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    write_json(out / layout.CHECKPOINT, {"step": step, "dir": final.name})
    for old in out.glob(f"{layout.CHECKPOINT_PREFIX}*"):
        if old.is_dir() and old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer) -> int:
    """Restore the last checkpoint (safetensors only: no pickle); the number of steps it holds (0: none)."""
    try:
        pointer = json.loads((out / layout.CHECKPOINT).read_text(encoding="utf-8"))
        folder = out / pointer["dir"]
        weights, state = load_file(str(folder / layout.CHECKPOINT_ADAPTER)), load_file(str(folder / layout.CHECKPOINT_OPTIMIZER))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"unreadable checkpoint ({exc}); delete {out / layout.CHECKPOINT} to start over", path=out) from None
    params = trainable(model)
    if set(weights) != set(params):
        raise TrainError(f"the checkpoint's LoRA weights do not fit this model; delete {out / layout.CHECKPOINT} to start over", path=out)
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    torch.set_rng_state(state.pop("torch_rng"))
    slots: dict[int, dict] = {}
    for key, value in state.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": optimizer.state_dict()["param_groups"]})
    return int(pointer["step"])


# ------------------------------------------------------------------------------ the loop




@dataclass(frozen=True)
class Trained:
    """A finished training: its summary (train.json) and, when it trained in this process, the model
    with its LoRA layers (`threeds.model.lora.merged` makes it the model to evaluate) and tokenizer."""

    summary: dict
    model: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase


def train_arm(spec: ModelConfig, records: Sequence[dict], config: TrainConfig, out: str | Path, meta: dict,
              progress: Progress | None = None) -> Trained:  # fmt: skip
    """`threeds train` and every arm of an experiment: load the base model (`spec`; its dtype is the
    training's --dtype), train a LoRA adapter on `records` into `out`, write the LlamaFactory files."""
    model, tokenizer = load_model(spec.model, dtype=spec.dtype)
    fmt = prompt_format(tokenizer, spec.template, spec.system)
    trained = train_lora(model, tokenizer, fmt, records, config, out, meta, progress)
    write_llamafactory(Path(out), records, config, resolve_model(spec.model), spec.template)
    return trained


def train_lora(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, records: Sequence[dict],
               config: TrainConfig, out: str | Path, meta: dict | None = None, progress: Progress | None = None) -> Trained:  # fmt: skip
    """Train a LoRA adapter on `records` into `out` (resuming a checkpoint there).

    `model` is the base model, loaded on its device; LoRA layers are added to it (the trained model
    comes back in `Trained.model`; None when `out` held this training finished already).
    `meta` (model name, data source) is recorded in train_config.json next to the settings."""
    out = Path(out)
    check_settings(config)  # a config built in code: the CLI checked its flags already
    examples = encode_examples(records, tokenizer, fmt, config.cutoff)
    if not any(e.n_targets for e in examples):
        raise TrainError(f"no response token is left within --cutoff {config.cutoff} in any record")
    plan = step_plan(len(examples), config)
    start_files(out, config, examples, plan, meta or {})
    summary = finished(out)
    if summary is not None:
        return Trained(summary, None, tokenizer)
    model = add_lora(model, config)
    model.train()
    optimizer = make_optimizer(model, config)
    done = load_checkpoint(out, model, optimizer)
    keep_loss_rows(out, done)
    started, device = time.perf_counter(), next(model.parameters()).device
    if progress:
        progress(done, len(plan))  # where training starts: steps of a checkpoint resumed do not count in its pace
    for step in range(done, len(plan)):
        try:
            row = one_step(model, optimizer, [examples[i] for i in plan[step]], step, len(plan), config, tokenizer.pad_token_id, device)
        except TrainError as exc:
            raise TrainError(str(exc), path=out) from None
        append_jsonl(out / layout.LOSS, [row | {"epoch": epoch_of(step, len(examples), config)}])
        if (step + 1) % config.save_steps == 0 and step + 1 < len(plan):
            save_checkpoint(out, model, optimizer, step + 1)
        if progress:
            progress(step + 1, len(plan))
    save_adapter(model, out)
    return Trained(finish(out, examples, plan, done, time.perf_counter() - started), model, tokenizer)


def save_adapter(model: PreTrainedModel, out: Path) -> None:
    """adapter_model.safetensors + adapter_config.json, as PEFT writes them, with the modes plain files
    get; a full disk is an OSError naming the folder (safetensors' writer raises its own error type)."""
    try:
        model.save_pretrained(out)
    except OSError:
        raise
    except Exception as exc:  # safetensors' SafetensorError wraps the OS error in its text
        found = re.search(r"code: (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(out / ADAPTER_WEIGHTS)) from None
    follow_umask(out)


def one_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer, batch: list[Example], step: int, total: int,
             config: TrainConfig, pad_id: int, device: torch.device) -> dict:  # fmt: skip
    lr = learning_rate(step, total, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, tokens = run_step(model, batch, config, pad_id, device)
    norm = float(torch.nn.utils.clip_grad_norm_(list(trainable(model).values()), config.max_grad_norm or math.inf))
    if not (math.isfinite(loss) and math.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainError(f"training diverged at step {step + 1} of {total}: the loss is {loss:g} and the gradient norm "
                         f"{norm:g} (learning rate {lr:g}); lower --lr. The step was not applied and no adapter written; "
                         "loss.jsonl and the last checkpoint hold the steps before")  # fmt: skip
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": loss, "lr": lr, "records": len(batch), "tokens": tokens}


def epoch_of(step: int, n: int, config: TrainConfig) -> int:
    per_epoch = math.ceil(n / (config.batch_size * config.grad_accum))
    return step // per_epoch + 1


def finished(out: Path) -> dict | None:
    """train.json of a finished training in `out`, or None."""
    try:
        summary = json.loads((out / layout.TRAIN_SUMMARY).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) and summary.get("finished") and (out / ADAPTER_WEIGHTS).is_file() else None


def start_files(out: Path, config: TrainConfig, examples: list[Example], plan: StepPlan, meta: dict) -> None:
    """ids.json and train_config.json; a directory holding another training (other ids or settings) is refused."""
    settings = {"train": dataclasses.asdict(config), **meta, "versions": package_versions()}
    ids = {"seed": config.seed, "ids": [e.id for e in examples], "order": [examples[i].id for i in plan.first_epoch()],
           "epochs": config.epochs}  # fmt: skip
    if (out / layout.CHECKPOINT).is_file() or (out / layout.TRAIN_SUMMARY).is_file():
        before = _json(out / layout.TRAIN_CONFIG), _json(out / layout.IDS)
        if {k: v for k, v in before[0].items() if k != "versions"} != {k: v for k, v in settings.items() if k != "versions"} or before[1] != ids:
            raise TrainError("holds a training with other settings, model or records; train into another --out, or "
                             "empty it to start over", path=out)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / layout.TRAIN_CONFIG, settings)
    write_json(out / layout.IDS, ids)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def keep_loss_rows(out: Path, steps: int) -> None:
    """loss.jsonl cut back to the steps the checkpoint holds (a killed run may have logged later ones)."""
    path = out / layout.LOSS
    rows = read_jsonl(path) if path.is_file() else []
    write_jsonl(path, [r for r in rows if r["step"] <= steps])


def finish(out: Path, examples: list[Example], plan: StepPlan, resumed: int, seconds: float) -> dict:
    summary = {
        "finished": True, "steps": len(plan), "resumed_at_step": resumed, "records": len(examples),
        "tokens": sum(e.n_targets for e in examples), "cut_off": sum(e.n_targets == 0 for e in examples),
        "seconds": round(seconds, 3), "final_loss": read_jsonl(out / layout.LOSS)[-1]["loss"] if plan else None,
    }  # fmt: skip
    write_json(out / layout.TRAIN_SUMMARY, summary)
    (out / layout.CHECKPOINT).unlink(missing_ok=True)
    for old in out.glob(f"{layout.CHECKPOINT_PREFIX}*"):
        shutil.rmtree(old, ignore_errors=True)
    return summary


# ------------------------------------------------------------------------------ LlamaFactory


TEMPLATES = {"qwen": "qwen", "baichuan": "baichuan2"}  # threeds --template -> LlamaFactory's


def write_llamafactory(out: Path, records: Sequence[dict], config: TrainConfig, model: str, template: str | None) -> Path:
    """llamafactory/: the records (Alpaca), dataset_info.json and train.yaml with these settings, for
    `llamafactory-cli train llamafactory/train.yaml` as the paper trained."""
    folder = out / layout.LLAMAFACTORY
    folder.mkdir(parents=True, exist_ok=True)
    (folder / layout.LF_DATA).write_text(export_text(records, "alpaca"), encoding="utf-8")
    write_json(folder / layout.LF_DATASET_INFO, dataset_info_entry(Path(layout.LF_DATA).stem, "alpaca"))
    lf_template = TEMPLATES.get(template or "", "")
    settings = {
        "model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "lora_target": "all", "dataset": Path(layout.LF_DATA).stem, "dataset_dir": str(folder),
        "template": lf_template or "CHANGEME", "cutoff_len": config.cutoff, "output_dir": str(folder / layout.LF_OUTPUT),
        "logging_steps": 1, "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum, "learning_rate": config.lr,
        "num_train_epochs": float(config.epochs), "lr_scheduler_type": config.scheduler,
        "warmup_ratio": config.warmup_ratio, "weight_decay": config.weight_decay, "max_grad_norm": config.max_grad_norm,
        "seed": config.seed, "bf16": True,
    }  # fmt: skip
    header = "### written by threeds train: LlamaFactory's LoRA SFT with the same settings\n"
    header += "" if lf_template else "### template: CHANGEME to your model's LlamaFactory template\n"
    text = yaml.safe_dump(settings, sort_keys=False, allow_unicode=True, width=10_000)  # quotes a path with ": " or " #"
    (folder / layout.LF_YAML).write_text(header + text, encoding="utf-8")
    return folder


def loss_rows(out: str | Path) -> list[dict]:
    """loss.jsonl of a training directory ([] when absent)."""
    path = Path(out) / layout.LOSS
    return read_jsonl(path) if path.is_file() else []

