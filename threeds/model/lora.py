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
from threeds.errors import ThreedsError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a PEFT adapter folder


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
    """`model` with the PEFT adapter saved in folder `adapter` merged into its weights."""
    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise ThreedsError(f"--adapter {adapter}: no {ADAPTER_CONFIG} (expected a PEFT adapter folder)")
    from peft import PeftModel

    return merged(PeftModel.from_pretrained(model, str(adapter)))


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """A model with LoRA layers (`add_lora`, `merge_adapter`) as the plain model with them merged in, for inference."""
    return model.merge_and_unload().eval()
