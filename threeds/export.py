"""Export a selection: file contents per format, the LlamaFactory `dataset_info.json` entry, and
the `threeds select` command line that reproduces the selection from the run directory."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence

from threeds.commands.select import FLAG_NAMES
from threeds.data import to_alpaca, to_sharegpt
from threeds.select import DEFAULT_BAND, METRICS

FORMATS = ("alpaca", "jsonl", "sharegpt")
SUFFIX = {"alpaca": ".json", "jsonl": ".jsonl", "sharegpt": ".json"}
MIME = {"alpaca": "application/json", "jsonl": "application/x-ndjson", "sharegpt": "application/json"}


def export_text(records: Sequence[dict], fmt: str) -> str:
    """The selected records as a file: Alpaca JSON array, Alpaca rows as JSON Lines, or ShareGPT."""
    if fmt == "alpaca":
        return json.dumps([to_alpaca(r) for r in records], ensure_ascii=False, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(to_alpaca(r), ensure_ascii=False) + "\n" for r in records)
    if fmt == "sharegpt":
        return json.dumps([to_sharegpt(r) for r in records], ensure_ascii=False, indent=2) + "\n"
    raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")


def file_name(dataset: str, fmt: str) -> str:
    return f"{dataset}_sharegpt.json" if fmt == "sharegpt" else f"{dataset}{SUFFIX[fmt]}"


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
    return {dataset: entry}


def select_command(
    run_dir: str,
    out: str,
    bands: Mapping[str, Sequence[float]],
    sample_num: int,
    atten_method: str = "mean",
    seed: int = 0,
) -> str:
    """The `threeds select` call that selects the same ids in the same order.

    One `--low-th/--up-th` pair when every metric shares a band, else one pair per metric.
    """
    resolved = {m: tuple(float(v) for v in bands.get(m, DEFAULT_BAND)) for m in METRICS}
    argv = ["threeds", "select", "--run", str(run_dir), "--out", str(out)]
    shared = set(resolved.values())
    if len(shared) == 1:
        low, high = shared.pop()
        argv += ["--low-th", _num(low), "--up-th", _num(high)]
    else:
        for metric in METRICS:
            low, high = resolved[metric]
            argv += [f"--{FLAG_NAMES[metric]}-low", _num(low), f"--{FLAG_NAMES[metric]}-up", _num(high)]
    argv += ["--sample-num", str(int(sample_num)), "--atten-method", atten_method, "--seed", str(int(seed))]
    return shlex.join(argv)


def _num(value: float) -> str:
    """Shortest text that parses back to the same float (25.0 -> '25')."""
    return repr(int(value)) if float(value).is_integer() else repr(float(value))
