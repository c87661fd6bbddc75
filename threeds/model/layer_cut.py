"""A smaller proxy of a model made by keeping some of its decoder layers (issue 33, item 5).

The construction is deterministic and needs no training, so the proxy check can run end to end on
real weights offline: of a model's L decoder layers keep K, evenly spaced and always the first and
the last, i.e. layer round(i (L - 1) / (K - 1)) for i = 0 .. K-1 (`kept_layers`). Embeddings, the
final norm and the output head are kept as they are; kept layer j takes the weights of original
layer kept[j]. The result is written like any model directory (config.json with
`num_hidden_layers = K` and `layer_cut` saying which layers, model.safetensors, the tokenizer) and
loads with `--model DIR`.
Dropping layers of a residual network leaves a model that still predicts tokens, less well: how
well its difficulty ranks agree with the full model's is what `threeds proxy-check` measures.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from threeds.errors import SettingsError

LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def kept_layers(total: int, keep: int) -> list[int]:
    """K of `total` layer indices, evenly spaced, first and last included (module docstring)."""
    if not 1 <= keep <= total:
        raise SettingsError(f"--keep {keep}: must be within 1-{total} (the model has {total} decoder layers)")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def cut_state_dict(state: dict, kept: list[int]) -> dict:
    """The weights of the kept layers renumbered 0..K-1, every other weight as it is."""
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for key, value in state.items():
        match = LAYER_KEY.match(key)
        if match is None:
            out[key] = value
        elif int(match.group(2)) in new_index:
            out[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = value
    return out


def cut_model(model: PreTrainedModel, keep: int) -> tuple[PreTrainedModel, list[int]]:
    """A new model of the same class with K of the layers (module docstring), and the kept indices."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    total = config.num_hidden_layers
    kept = kept_layers(total, keep)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    small = model.__class__(config)
    small.load_state_dict(cut_state_dict(model.state_dict(), kept), strict=True)
    return small.eval(), kept


def save_cut(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, keep: int, out: str | os.PathLike,
             source: str) -> dict:  # fmt: skip
    """Cut `model` to `keep` layers and write it with `tokenizer` into `out` (replaced whole, atomically);
    returns the description, also kept in the config as `layer_cut`."""
    out = Path(out)
    small, kept = cut_model(model, keep)
    described = {
        "source": source, "layers": model.config.num_hidden_layers, "kept": kept,
        "rule": "round(i * (L - 1) / (K - 1)) for i in 0..K-1 (first and last kept)",
        "parameters": sum(p.numel() for p in small.parameters()),
        "source_parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    small.config.layer_cut = described  # kept in config.json: where the model came from
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        small.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return described
