"""Proxy checks as files: read one, link a run scored by a proxy to the check that justified it,
and find the checks that concern a run (issue 33, item 4).

A check lives in the proxy's own run directory as `proxy_check.json` (`threeds proxy-check`). A
run scored with `--model PROXY --proxy-check DIR` records the link in its manifest under
`proxy_check` (the check's folder, the proxy and target models, the verdict); the app shows it
beside the model that scored the run.
"""

from __future__ import annotations

import os
from pathlib import Path

from threeds.errors import ThreedsError
from threeds.rundir import layout
from threeds.rundir.check import RunFileError, read_json_object

REQUIRED = ("target", "proxy", "agreement", "verdict")


class ProxyLinkError(ThreedsError):
    """A --proxy-check folder that holds no check, or one that checked another model."""


def read_check(folder: str | os.PathLike) -> dict:
    """proxy_check.json of `folder`, with the sections every reader relies on; one line naming the file otherwise."""
    path = Path(folder) / layout.PROXY_CHECK
    if not path.is_file():
        raise ProxyLinkError(f"{path}: no proxy check there (make one with threeds proxy-check --out {folder})")
    check = read_json_object(path)
    missing = [key for key in REQUIRED if not isinstance(check.get(key), dict)]
    if missing:
        raise RunFileError(f"field {missing[0]}: missing or not an object; run threeds proxy-check again", path=path)
    return check


def same_model(a: str | None, b: str | None) -> bool:
    """Two --model specs name the same model: the same folder or file, else the same text."""
    if a is None or b is None:
        return a == b
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return str(a) == str(b)


def proxy_link(folder: str | os.PathLike, model: str | None) -> dict:
    """What a run scored by `model` records about the check in `folder` (manifest `proxy_check`);
    ProxyLinkError when the check was made for another model."""
    check = read_check(folder)
    checked = check["proxy"].get("model")
    if not same_model(checked, model):
        raise ProxyLinkError(f"--proxy-check {folder}: that check is of the proxy {checked}, not of --model "
                             f"{model or '(the embedded model)'}; check this model first or pass its own check")  # fmt: skip
    decided = check["verdict"]
    return {
        "path": str(Path(folder).resolve()), "proxy_model": checked, "target_model": check["target"].get("model"),
        "target_run": check["target"].get("run"), "verdict": decided.get("verdict"), "passed": bool(decided.get("passed")),
        "words": decided.get("words"),
    }  # fmt: skip


def checks_of(run_dir: str | os.PathLike, manifest: dict, cache_dir: str | os.PathLike) -> dict[str, Path]:
    """Checks that concern a run, by role -> folder: "own" (the run is a proxy's scoring, with its check),
    "justifies" (the check its manifest links), and "of <folder name>" for each check under `cache_dir`
    whose target is this run. Unreadable ones are left out (the page that opens one says why)."""
    run_dir = Path(run_dir).resolve()
    found: dict[str, Path] = {}
    if (run_dir / layout.PROXY_CHECK).is_file():
        found["own"] = run_dir
    link = manifest.get("proxy_check")
    if isinstance(link, dict) and isinstance(link.get("path"), str) and (Path(link["path"]) / layout.PROXY_CHECK).is_file():
        found["justifies"] = Path(link["path"])
    cache = Path(cache_dir)
    for path in sorted(cache.glob(f"*/{layout.PROXY_CHECK}")) if cache.is_dir() else []:
        try:
            target = read_json_object(path).get("target")
        except RunFileError:
            continue
        if isinstance(target, dict) and target.get("run") == str(run_dir):
            found[f"of {path.parent.name}"] = path.parent
    return found
