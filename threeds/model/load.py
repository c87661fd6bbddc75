"""Load the target model: the embedded SmolLM2 GGUF, a `.gguf` file, a local directory or a hub id.

Loading a GGUF file dequantises every tensor (~15-25 s on CPU); the first load therefore writes a
plain safetensors copy to `cache/models/<name>-<hash>/` so later loads take a second or two.

Every spec is checked before transformers sees it, so a bad one ends in one line that says why in
words (`ModelError`): no such path, not a GGUF file, no config.json or no weights in a directory,
only a pickled `pytorch_model.bin` (never loaded: a pickle can run code), a hub id that is neither
in the local Hugging Face cache nor reachable (checked with one short request, not transformers'
retries). A hub id found in the cache is loaded from there without any network call.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from threeds.errors import first_line
from threeds.io.atomic import follow_umask
from threeds.model.files import (
    MODEL_CONFIG,
    ModelError,
    check_gguf,
    check_model_dir,
    embedded_gguf_path,
)
from threeds.model.lora import merge_adapter

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("cache/models")
HUB_TIMEOUT = 5.0  # seconds for the one request that tells whether a hub id can be fetched
# What transformers raises for a model it cannot read (a bad config, a truncated safetensors file, ...).
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, ImportError, SafetensorError)


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
        follow_umask(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str | os.PathLike | None, cache_dir: Path = DEFAULT_CACHE) -> str:
    """Turn a model spec into something `from_pretrained` loads fast: a checked directory, or a hub
    id that can be fetched; ModelError saying why in words otherwise."""
    if spec is None:
        gguf = embedded_gguf_path()
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            return check_model_dir(path, spec)
        if path.suffix.lower() != ".gguf" and not path.exists():
            return hub_source(str(spec))
        gguf = check_gguf(path, spec)
    target = _gguf_copy_dir(gguf, cache_dir)
    if not (target / MODEL_CONFIG).exists():
        try:
            convert_gguf(gguf, target)
        except LOAD_ERRORS as exc:
            raise ModelError(f"--model {spec or gguf}: not a readable GGUF file ({first_line(exc)})") from exc
    return str(target)


def hub_source(spec: str) -> str:
    """A hub id: its snapshot in the local Hugging Face cache (no network call), else the id when one
    short request shows the hub serves it; ModelError at once when there is no network."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise ModelError(f"--model {spec}: no such file or directory") from None
    cached = try_to_load_from_cache(spec, MODEL_CONFIG)
    if isinstance(cached, str):
        return check_model_dir(Path(cached).parent, spec)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelError(f"--model {spec}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set: pass a local directory")
    try:
        HfApi().model_info(spec, timeout=HUB_TIMEOUT)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelError(f"--model {spec}: no such local directory, and the hub does not serve it to you "
                         f"({first_line(exc)})") from exc  # fmt: skip
    except Exception as exc:  # whatever stops the request (DNS, proxy, timeout): no network
        raise ModelError(f"--model {spec}: no such local directory, and no network to fetch hub id {spec} "
                         f"({first_line(exc)}) nor a copy in the local Hugging Face cache: pass a local directory") from exc  # fmt: skip
    return spec



def load_tokenizer(spec: str | os.PathLike | None = None, cache_dir: Path = DEFAULT_CACHE) -> PreTrainedTokenizerBase:
    return _tokenizer_from(resolve_model(spec, cache_dir))


def _tokenizer_from(source: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except LOAD_ERRORS as exc:
        raise ModelError(f"{source}: cannot load the tokenizer ({first_line(exc)})") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    cache_dir: Path = DEFAULT_CACHE,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for inference, the one path from a model spec to a model: `spec=None`
    is the embedded SmolLM2-135M-Instruct; `adapter`, a PEFT adapter folder merged into the weights;
    `dtype` a name in DTYPES, "auto" or None (the device's default)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    source = resolve_model(spec, cache_dir)
    try:  # safetensors only: a pickle is never loaded, whatever the directory holds
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation,
                                                     use_safetensors=True)  # fmt: skip
    except LOAD_ERRORS as exc:
        raise ModelError(f"--model {spec or source}: cannot load the model ({first_line(exc)})") from exc
    model.to(device).eval()
    if adapter is not None:
        model = merge_adapter(model, adapter)
    return model, _tokenizer_from(source)
