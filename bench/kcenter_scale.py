"""k-center at the paper's shape: survivors read from a memory-mapped embeddings.npy, then the greedy.

The cold read (the file's pages dropped from the page cache first, posix_fadvise) and a warm
read are timed apart from k-center; each code tree runs in its own subprocess so that its
memory is its own (peak anonymous memory sampled every 50 ms, the mapped file's pages apart).
Survivors: every `--stride`-th row (the paper's bands keep a random-looking 12.5%: stride 8).

    python bench/kcenter_scale.py --embeddings /work/scale/paper/embeddings.npy --stride 8 --k 5000 \
        --tree after=. --tree before=/work/before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _anon_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def worker(args: argparse.Namespace) -> dict:
    import numpy as np

    from threeds.selection.kcenter import k_center_greedy

    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _anon_mib())

    threading.Thread(target=sample, daemon=True).start()
    emb = np.load(args.embeddings, mmap_mode="r")
    rows = np.arange(0, len(emb), args.stride)
    out = {"rows": len(rows), "dim": emb.shape[1], "dtype": str(emb.dtype), "load_before": os.getloadavg()[0]}
    with open(args.embeddings, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    for read in ("cold_read_s", "warm_read_s"):
        start = time.perf_counter()
        chosen = np.ascontiguousarray(emb[rows])
        out[read] = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    picks = k_center_greedy(chosen, args.k, seed=0, device="cpu")
    out["kcenter_s"], out["kcenter_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
    stop.set()
    out["peak_anon_mib"] = max(peak[0], _anon_mib())
    out["load_after"] = os.getloadavg()[0]
    out["picks"] = picks.tolist()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--tree", action="append", default=[], help="NAME=DIR: a threeds checkout (its .venv's python)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {}
    for tree in args.tree or ["after=."]:
        name, folder = tree.split("=", 1)
        folder = Path(folder).resolve()
        python = folder / ".venv" / "bin" / "python"
        cmd = [str(python if python.exists() else sys.executable), str(Path(__file__).resolve()), "--worker",
               "--embeddings", str(args.embeddings), "--stride", str(args.stride), "--k", str(args.k)]  # fmt: skip
        print(f"running {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=folder, env={**os.environ, "PYTHONPATH": str(folder)})
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| tree | survivors | cold read (s) | warm read (s) | k-center wall (s) | k-center CPU (s) | peak anon (MiB) | load before / after |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rows']:,} x {r['dim']} {r['dtype']} | {r['cold_read_s']:.1f} | {r['warm_read_s']:.1f} | "
              f"{r['kcenter_s']:.1f} | {r['kcenter_cpu_s']:.1f} | {r['peak_anon_mib']:.0f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")  # fmt: skip
    names = list(results)
    for a, b in zip(names, names[1:]):
        same = results[a]["picks"] == results[b]["picks"]
        print(f"- picks of {a} and {b}: {'identical' if same else 'DIFFERENT'} ({len(results[a]['picks']):,} picks)")


if __name__ == "__main__":
    main()
