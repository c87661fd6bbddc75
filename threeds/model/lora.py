"""The PEFT half of building a model: LoRA layers added for training, an adapter merged for inference.

A merged adapter runs at the base model's speed. Merging the LoRA weights of a model just trained
gives the same weights as loading its saved adapter onto a fresh base model of the same dtype
(`merge_adapter`): the adapter is saved and read back as float32 safetensors, and PEFT computes the
merged delta the same way in both cases, so an experiment evaluates the model it trained without
loading it again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from threeds.config import TrainConfig
from threeds.errors import ThreedsError, first_line
from threeds.io.data import loads_bounded, read_text

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a PEFT adapter folder
PICKLED_ADAPTER = "adapter_model.bin"  # PEFT's pickle format: never loaded


def add_lora(model: PreTrainedModel, config: TrainConfig) -> PreTrainedModel:
    """LoRA on every linear layer but the output head (LlamaFactory's `lora_target: all`), seeded;
    every base weight frozen."""
    from peft import LoraConfig, get_peft_model  # a slow import: only when training

    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    for param in model.parameters():
        param.requires_grad_(False)
    return get_peft_model(model, lora)


def merge_adapter(model: PreTrainedModel, adapter: str | Path) -> PreTrainedModel:
    """`model` with the PEFT adapter saved in folder `adapter` merged into its weights; one line
    naming the adapter's file when it cannot be (`check_adapter`, or weights of another base's shapes)."""
    adapter = Path(adapter)
    check_adapter(adapter)
    from peft import PeftModel

    try:
        return merged(PeftModel.from_pretrained(model, str(adapter)))
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # size mismatch, unknown modules, bad config fields
        raise ThreedsError(f"--adapter {adapter}: does not fit this model ({first_line(exc)}); was it trained on "
                           "another base model?") from None  # fmt: skip


def check_adapter(adapter: Path) -> None:
    """ThreedsError naming the file when `adapter` is not a PEFT adapter folder threeds loads: its
    adapter_config.json a JSON object, its weights a readable adapter_model.safetensors (a pickled
    adapter_model.bin is refused unread; without weights PEFT would ask the Hub for a repo named after
    the folder)."""
    if not adapter.is_dir():
        raise ThreedsError(f"--adapter {adapter}: not a folder (expected a PEFT adapter folder)")
    config = adapter / ADAPTER_CONFIG
    if not config.is_file():
        raise ThreedsError(f"--adapter {adapter}: no {ADAPTER_CONFIG} (expected a PEFT adapter folder)")
    try:
        value = loads_bounded(read_text(config))
    except (ValueError, OSError) as exc:  # DataError, JSONDecodeError, nesting: all ValueErrors
        raise ThreedsError(f"{config}: not a readable JSON file ({first_line(exc)})") from None
    if not isinstance(value, dict):
        raise ThreedsError(f"{config}: expected a JSON object, got {type(value).__name__}")
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (adapter / PICKLED_ADAPTER).exists():
            raise ThreedsError(f"--adapter {adapter}: only {PICKLED_ADAPTER}, a pickle, which threeds never loads (it can run "
                               f"code): save the adapter as {ADAPTER_WEIGHTS} on a machine you trust")  # fmt: skip
        raise ThreedsError(f"--adapter {adapter}: no {ADAPTER_WEIGHTS} next to {ADAPTER_CONFIG}")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:  # checks the header and that the file covers every tensor it lists
            names = list(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError for a bad header or a short file
        raise ThreedsError(f"{weights}: not a readable safetensors file ({first_line(exc)})") from None
    if not names:
        raise ThreedsError(f"{weights}: holds no weights")


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """A model with LoRA layers (`add_lora`, `merge_adapter`) as the plain model with them merged in, for inference."""
    return model.merge_and_unload().eval()
