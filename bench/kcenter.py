"""k-center greedy: threeds.selection.kcenter.k_center_greedy against the original 3DS approach.

The original release keeps `min_distances` and, for every pick, calls
`sklearn.metrics.pairwise_distances(features, features[[new_center]])` on float16 features and
takes `np.minimum` (the kCenterGreedy pattern). That costs about the same for every pick, so with
`--baseline-steps N` (N < k) it times the first N picks, once before and once after threeds runs
(the machine's load may change meanwhile), and extrapolates: mean time per pick x k.

Each method runs in its own subprocess so that its peak resident memory (ru_maxrss, which covers
numpy and torch alike) is its own; "working memory" is that peak minus the resident size just
before the call, i.e. memory beyond the input array. On CUDA the peak allocated device memory is
reported too.

    python bench/kcenter.py --n 100000 --dim 1024 --k 5000 --baseline-steps 50
    python bench/kcenter.py --large            # 1M x 3584 -> 5k on a GPU, float16 and float32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from threeds.selection.kcenter import k_center_greedy, resolve_device  # noqa: E402

_GEN_ROWS = 16384


def make_data(n: int, dim: int, seed: int, dtype=np.float32) -> np.ndarray:
    """Standard-normal rows generated chunk by chunk (same numbers as one call) into `dtype`."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=dtype)
    for s in range(0, n, _GEN_ROWS):
        out[s : s + _GEN_ROWS] = rng.standard_normal((min(_GEN_ROWS, n - s), dim), dtype=np.float32)
    return out


def make_device_data(n: int, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """float32 rows generated on the device: host generation of 1M x 3584 takes minutes."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((n, dim), generator=gen, device=device, dtype=torch.float32)


def baseline_kcenter(features: np.ndarray, k: int, seed: int) -> list[int]:
    """The original step-by-step approach (kCenterGreedy.select_batch_ / update_distances)."""
    from sklearn.metrics import pairwise_distances

    min_distances = None
    picks = []
    for _ in range(k):
        if min_distances is None:
            ind = int(np.random.default_rng(seed).integers(len(features)))  # spec's first centre
        else:
            ind = int(np.argmax(min_distances))
        dist = pairwise_distances(features, features[[ind]], metric="euclidean")
        if min_distances is None:
            min_distances = np.min(dist, axis=1).reshape(-1, 1)
        else:
            min_distances = np.minimum(min_distances, dist)
        picks.append(ind)
    return picks


def _rss_mib() -> float:
    """Current resident set size (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_seconds() -> float:
    """User + system time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn) -> tuple[object, float, float]:
    """fn(), its wall seconds and its CPU seconds."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = fn()
    return result, time.perf_counter() - wall, _cpu_seconds() - cpu


def _run_baseline(args: argparse.Namespace, out: dict) -> np.ndarray:
    x = make_data(args.n, args.dim, args.seed, np.float16)
    out["rss_before_mib"] = _rss_mib()
    out["picks"], out["seconds"], out["cpu_seconds"] = _timed(
        lambda: baseline_kcenter(x, args.baseline_steps, args.seed)
    )
    out["steps"] = args.baseline_steps
    out["peak_rss_mib"] = _peak_rss_mib()
    return x


def _run_ours(args: argparse.Namespace, out: dict) -> np.ndarray | torch.Tensor:
    device = torch.device(resolve_device(args.device))
    dtype = args.worker.split(":")[1]
    cuda = device.type == "cuda"
    k_center_greedy(np.random.default_rng(0).standard_normal((64, 8)), 4, device=device)  # warm-up
    if args.data_on == "device":
        x = make_device_data(args.n, args.dim, args.seed, device)
    else:
        x = make_data(args.n, args.dim, args.seed)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda0 = torch.cuda.memory_allocated()
    out["rss_before_mib"] = _rss_mib()
    run = lambda k: k_center_greedy(x, k, seed=args.seed, device=device, dtype=dtype)  # noqa: E731
    _, out["setup_seconds"], _ = _timed(lambda: run(1))  # upload + norms alone
    picks, out["seconds"], out["cpu_seconds"] = _timed(lambda: run(args.k))
    out["picks"], out["steps"] = picks.tolist(), args.k
    out["peak_rss_mib"] = _peak_rss_mib()
    out["device"] = f"{device} ({torch.cuda.get_device_name()})" if cuda else str(device)
    if cuda:
        out["cuda_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - cuda0) / 2**20
    if args.baseline_steps and isinstance(x, np.ndarray):  # after the memory readings
        rounded = x.astype(np.float16).astype(np.float32)  # the values the original sees
        first = k_center_greedy(rounded, args.baseline_steps, seed=args.seed, device=device, dtype=dtype)
        out["picks_on_f16_values"] = first.tolist()
    return x


def worker(args: argparse.Namespace) -> dict:
    """One measured run in this process; returns timings, memory, load and picks."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"method": args.worker, "torch_threads": torch.get_num_threads()}
    out["load_before"] = os.getloadavg()[0]
    x = _run_baseline(args, out) if args.worker == "baseline" else _run_ours(args, out)
    out["input_mib"] = x.nbytes / 2**20
    out["load_after"] = os.getloadavg()[0]
    return out


def run_worker(args: argparse.Namespace, method: str) -> dict:
    """Run `worker` in a fresh interpreter so ru_maxrss belongs to this method alone."""
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(args.n), "--dim", str(args.dim),
           "--k", str(args.k), "--seed", str(args.seed), "--baseline-steps", str(args.baseline_steps),
           "--device", args.device or "auto", "--data-on", args.data_on, "--threads", str(args.threads)]  # fmt: skip
    print(f"running {method} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{method} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _agree(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two pick orders."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _label(r: dict) -> str:
    if r["method"] == "baseline":
        return "original: sklearn pairwise_distances, float16"
    return f"threeds, {r['method'].split(':')[1]} on {r['device']}"


def _row(name: str, r: dict, k: int) -> str:
    mark = "" if r["steps"] == k else " (extrapolated)"
    setup = f"{r['setup_seconds']:.2f}" if "setup_seconds" in r else "-"
    cuda = f"{r['cuda_peak_extra_mib']:.0f}" if "cuda_peak_extra_mib" in r else "-"
    return (
        f"| {name} | {r['steps']:,} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
        f"{1000 * r['seconds'] / r['steps']:.1f} | {r['seconds'] / r['steps'] * k:.1f}{mark} | {setup} | "
        f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_mib']:.0f} | {cuda} | "
        f"{r['load_before']:.1f} / {r['load_after']:.1f} |"
    )


def report(args: argparse.Namespace, bases: list[dict], ours: list[dict], command: str) -> str:
    """Markdown: a table, the speed-ups (wall and CPU time) and pick agreement."""
    lines = [
        f"## k-center greedy: {args.n:,} x {args.dim} random float32 -> {args.k:,} picks",
        "",
        f"Command: `{command}`",
        "",
        "| method | picks timed | wall (s) | CPU (s) | wall per pick (ms) | full k, wall (s) | setup (s) "
        "| peak RSS (MiB) | working RSS (MiB) | CUDA peak extra (MiB) | load avg before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bases[:1] + ours + bases[1:]:  # the order they ran in
        lines.append(_row(_label(r), r, args.k))
    lines += [
        "",
        f"Input: {ours[0]['input_mib']:.0f} MiB float32 for threeds (the original holds it as float16); "
        f"torch threads: {ours[0]['torch_threads']}; machine: {os.cpu_count()} CPUs.",
        "",
    ]
    if bases:
        steps = sum(b["steps"] for b in bases)
        base_wall = sum(b["seconds"] for b in bases) / steps * args.k
        base_cpu = sum(b["cpu_seconds"] for b in bases) / steps * args.k
        lines.append(
            f"- The original ran {steps} picks ({' + '.join(str(b['steps']) for b in bases)}, timed before and "
            f"after threeds to average out load changes); its full {args.k:,} picks are extrapolated as "
            f"time per pick x {args.k:,}: {base_wall:.0f} s wall, {base_cpu:.0f} s CPU."
        )
        for r in ours:
            lines.append(
                f"- {_label(r)}: **{base_wall / r['seconds']:.1f}x** faster than the original in wall "
                f"time, {base_cpu / r['cpu_seconds']:.1f}x in CPU time."
            )
            if args.data_on == "device":  # torch's generator: other numbers than the original's
                lines.append("  Picks not compared with the original's: the data was generated on the device.")
                continue
            n = bases[0]["steps"]
            same = _agree(bases[0]["picks"], r["picks"])
            line = f"  First {n} picks identical to the original's: {same} of {n}"
            if "picks_on_f16_values" in r:
                same = _agree(bases[0]["picks"], r["picks_on_f16_values"])
                line += f"; {same} of {n} when threeds gets the original's float16-rounded values"
            lines.append(line + ".")
    if (args.n, args.dim, args.k) == (1_000_000, 3584, 5000):
        for r in ours:
            verdict = "met" if r["seconds"] < 30 else "NOT met"
            lines.append(f"- Target < 30 s on an H100: {verdict} by {_label(r)} ({r['seconds']:.1f} s).")
    for a, b in zip(ours, ours[1:]):
        same = _agree(a["picks"], b["picks"])
        lines.append(f"- {_label(a)} vs {_label(b)}: first {same} of {args.k:,} picks identical.")
    lines += [
        "- Peak RSS: ru_maxrss of the method's own subprocess, input included; working RSS: peak minus the "
        "resident size just before the call. CPU: user + system seconds of the process, all threads.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-steps", type=int, default=50,
                   help="picks of the original to time before and after ours (extrapolated); 0: skip")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"])
    p.add_argument("--data-on", choices=["host", "device"], default="host",
                   help="where ours gets its input; 'device' generates it there (no upload timed)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--large", action="store_true",
                   help="GPU preset: 1M x 3584 -> 5k, float16 and float32, data on the device, no original")  # fmt: skip
    p.add_argument("--out", type=Path, help="also write the markdown report here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.device = None if args.device == "auto" else args.device
    if args.worker:
        print(json.dumps(worker(args)))
        return
    command = "python bench/kcenter.py " + shlex.join(sys.argv[1:])
    if args.large:
        args.n, args.dim, args.k, args.baseline_steps = 1_000_000, 3584, 5000, 0
        args.dtype, args.data_on = ["float16", "float32"], "device"
    args.baseline_steps = min(args.baseline_steps, args.k)
    bases = [run_worker(args, "baseline")] if args.baseline_steps else []
    ours = [run_worker(args, f"ours:{dt}") for dt in args.dtype]
    bases += [run_worker(args, "baseline")] if args.baseline_steps else []
    text = report(args, bases, ours, command)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
