"""Export a selection: file contents per format, the LlamaFactory `dataset_info.json` entry, and
the `threeds select` command line that reproduces the selection from the run directory."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from threeds.config import SelectConfig, to_argv
from threeds.io.data import strict_json, to_alpaca, to_sharegpt

FORMATS = ("alpaca", "jsonl", "sharegpt")
SUFFIX = {"alpaca": ".json", "jsonl": ".jsonl", "sharegpt": ".json"}
MIME = {"alpaca": "application/json", "jsonl": "application/x-ndjson", "sharegpt": "application/json"}


def export_text(records: Sequence[dict], fmt: str) -> str:
    """The selected records as a file: Alpaca JSON array, Alpaca rows as JSON Lines, or ShareGPT."""
    if fmt == "alpaca":
        return strict_json([to_alpaca(r) for r in records], indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(strict_json(to_alpaca(r)) + "\n" for r in records)
    if fmt == "sharegpt":
        return strict_json([to_sharegpt(r) for r in records], indent=2) + "\n"
    raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")


def safe_name(dataset: str) -> str:
    """The dataset name as a plain file name: letters and digits of any script, '.', '_' and '-' only, not starting
    with a dot (no path separators, no hidden or parent-directory names); '_' for the rest."""
    name = re.sub(r"[^\w.-]", "_", dataset.strip()).lstrip(".")
    return name or "dataset"


def file_name(dataset: str, fmt: str) -> str:
    dataset = safe_name(dataset)
    return f"{dataset}_sharegpt.json" if fmt == "sharegpt" else f"{dataset}{SUFFIX[fmt]}"


def selection_file_name(dataset: str) -> str:
    """The file `threeds select` writes in the command the Export page shows."""
    return f"{dataset}_selected.json"


def dataset_info_entry(dataset: str, fmt: str, has_system: bool = False) -> dict:
    """`{dataset: {...}}` to merge into LlamaFactory's data/dataset_info.json for the exported file."""
    entry: dict = {"file_name": file_name(dataset, fmt)}
    if fmt == "sharegpt":
        entry["formatting"] = "sharegpt"
        entry["columns"] = {"messages": "conversations", **({"system": "system"} if has_system else {})}
        entry["tags"] = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
    else:
        entry["columns"] = {"prompt": "instruction", "query": "input", "response": "output"}
        if has_system:
            entry["columns"]["system"] = "system"
    return {safe_name(dataset): entry}


def select_command(run_dir: str, out: str, config: SelectConfig) -> str:
    """The `threeds select` call that selects the same ids in the same order: every setting spelled
    out, so it does not depend on the defaults of the threeds that runs it."""
    argv = ["threeds", "select", "--run", str(run_dir), "--out", str(out), *to_argv(config, explicit=True)]
    return shlex.join(argv)


def compare_selections(saved: Sequence[str], shown: Sequence[str]) -> str:
    """How the run's selection.json compares with the selection shown: the ids as sets first, their
    order apart (a file written in another order holds the same samples)."""
    head = f"The run's own selection.json has {len(saved):,} ids; "
    if list(saved) == list(shown):
        return head + "this selection is identical, in the same order."
    if set(saved) == set(shown) and len(saved) == len(shown):
        return head + "this selection holds the same samples, in another order (pick order here)."
    only_file, only_here = len(set(saved) - set(shown)), len(set(shown) - set(saved))
    return head + f"this selection differs: {only_here:,} samples only here, {only_file:,} only in selection.json."
