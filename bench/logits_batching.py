"""`--rating-mode logits` before and after batching over records, side by side in one process (BENCHMARKS.md (f)).

Before: `threeds/rating_logits.py` as of `--before REV` (default 6b7d328: each record prefilled
alone on the shared start, then its candidate first digits continued on copies of its cache).
After: this tree's `expected_scores` with LocalBackend's default batch bounds. Both score the same
first `--n` MedQuAD rating prompts (en-medical) with the embedded model, `--rounds` times,
alternating which goes first; the best wall and CPU seconds of each (CPU time does not count the
seconds the process was paused by others), and the largest score and digit-mass differences.

    python bench/logits_batching.py --n 20 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threeds.io.data import read_records  # noqa: E402
from threeds.model.backends import LocalBackend  # noqa: E402
from threeds.model.decode import shared_prefix  # noqa: E402
from threeds.stages.rate import load_rating_prompt, render  # noqa: E402
from threeds.stages.rating_logits import digit_ids, expected_scores, prompt_batches  # noqa: E402

DATA = ROOT / "threeds" / "sample_data" / "medquad_en_200.jsonl"


def module_at(rev: str):
    """threeds/rating_logits.py as of git revision `rev`, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:threeds/rating_logits.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "rating_logits_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("rating_logits_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="records to rate (default: 20)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default="6b7d328", help="git revision of the one-record-at-a-time code")
    args = parser.parse_args()
    old = module_at(args.before)
    records, _ = read_records(DATA, "rename")
    backend = LocalBackend()
    model, tokenizer = backend.load()
    encoded, _ = backend.encode([render(load_rating_prompt("en-medical"), r) for r in records[: args.n]])
    digits = digit_ids(tokenizer)

    def before():
        with torch.inference_mode():
            prefix = shared_prefix(model, encoded)
        return [old.expected_score(model, ids, digits, prefix) for ids in encoded]

    def after():
        with torch.inference_mode():
            prefix = shared_prefix(model, encoded)
        return expected_scores(model, encoded, digits, prefix, batch_tokens=backend.batch_tokens,
                               max_rows=backend.batch_size)  # fmt: skip

    print(f"{args.n} records, prompt tokens mean {sum(map(len, encoded)) / args.n:.0f}, max {max(map(len, encoded))}; "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    runs = {"before": before, "after": after}
    wall, cpu, out = {k: [] for k in runs}, {k: [] for k in runs}, {}
    for rnd in range(args.rounds):
        for name in list(runs) if rnd % 2 == 0 else list(runs)[::-1]:
            began, began_cpu = time.perf_counter(), time.process_time()
            out[name] = runs[name]()
            wall[name].append(time.perf_counter() - began)
            cpu[name].append(time.process_time() - began_cpu)
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {wall[k][-1]:.1f} s wall / {cpu[k][-1]:.1f} s CPU" for k in runs),
              flush=True)  # fmt: skip
    with torch.inference_mode():
        start = shared_prefix(model, encoded).length
    sizes = [len(b) for b in prompt_batches([len(e) for e in encoded], start, backend.batch_size, backend.batch_tokens)]
    pairs = list(zip(out["before"], out["after"]))
    bw, aw, bc, ac = min(wall["before"]), min(wall["after"]), min(cpu["before"]), min(cpu["after"])
    print(f"batches of {sizes} prompts; largest difference: score {max(abs(a[0] - b[0]) for a, b in pairs):.2g}, "
          f"digit_mass {max(abs(a[1] - b[1]) for a, b in pairs):.2g}")  # fmt: skip
    print(f"best of {args.rounds}: wall before {bw:.1f} s, after {aw:.1f} s ({bw / aw:.2f}x); "
          f"CPU before {bc:.1f} s, after {ac:.1f} s ({bc / ac:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
