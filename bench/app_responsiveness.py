"""How fast the app re-renders when a slider moves, on a synthetic 100k-sample run.

What is timed: Streamlit's `AppTest` moving one slider and re-running the page script, i.e. the
server side of a re-render: the page's Python (library calls, cache look-ups, figure building)
and the serialisation of every element to protobuf. Not timed: the websocket hop and the
browser drawing the Plotly charts. Every move sets a value not used before, so the band filter
and the figures are recomputed, not served from a cache; what stays cached is what the app caches
on purpose (the loaded run, histogram bins, the UMAP map, the k-center pick order).

The run has the files of docs/DESIGN.md with synthetic numbers (tests/synthetic_run.py), float32
embeddings of width 576 (SmolLM2-135M's hidden size), and no tokens.parquet (no slider reads it).
UMAP is replaced by a PCA projection unless --real-umap (its one-time cost is not a re-render).

    python bench/app_responsiveness.py                     # 100k samples, 21 moves per slider
    python bench/app_responsiveness.py --n 20000 --moves 11
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from synthetic_run import make_run  # noqa: E402

from threeds.config import SelectConfig  # noqa: E402
from threeds.rundir.read import load_run, run_settings  # noqa: E402
from threeds.selection.apply import select_dir  # noqa: E402
from threeds.views import embed_map  # noqa: E402


def pca_2d(emb: np.ndarray) -> np.ndarray:
    sample = np.asarray(emb[:: max(1, len(emb) // 20000)], dtype=np.float64)
    mean = sample.mean(0)
    axes = np.linalg.svd(sample - mean, full_matrices=False)[2][:2]
    return ((np.asarray(emb, dtype=np.float64) - mean) @ axes.T).astype(np.float32)


def build(cache: Path, n: int, dim: int, real_umap: bool) -> dict:
    started = time.perf_counter()
    run_dir = make_run(cache / "bench", n=n, n_dropped=n // 5, dim=dim, tokens=False, nan_rows=n // 1000)
    timings = {"build_run_s": time.perf_counter() - started}
    run = load_run(run_dir)
    started = time.perf_counter()
    if real_umap:
        embed_map.load_or_compute_umap(run_dir, run.embeddings)
    else:
        real = embed_map.compute_umap
        embed_map.compute_umap = lambda emb, settings=None: pca_2d(emb)
        embed_map.load_or_compute_umap(run_dir, run.embeddings)
        embed_map.compute_umap = real
    timings["map_s"] = time.perf_counter() - started
    started = time.perf_counter()
    settings = run_settings(run)
    select_dir(run_dir, SelectConfig.from_bands(settings.pop("bands"), **settings))  # what `threeds run` ends with: its pick order is kept
    timings["select_s"] = time.perf_counter() - started
    return timings


def timed_moves(at, key: str, values: list, widget: str = "slider") -> list[float]:
    times = []
    for value in values:
        started = time.perf_counter()
        getattr(at, widget)(key=key).set_value(value).run()
        times.append(time.perf_counter() - started)
        if at.exception:
            raise RuntimeError(at.exception[0].value)
    return times


def open_page(page: str, **state):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600).run()
    for key, value in state.items():
        at.session_state[key] = value
    started = time.perf_counter()
    at.switch_page(page).run()
    first = time.perf_counter() - started
    if at.exception:
        raise RuntimeError(at.exception[0].value)
    return at, first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="scored samples (default: 100000)")
    parser.add_argument("--dim", type=int, default=576, help="embedding width (default: 576)")
    parser.add_argument("--moves", type=int, default=21, help="slider moves timed per slider (default: 21)")
    parser.add_argument("--sample-num", type=int, default=5000, help="k-center picks on the map and export pages")
    parser.add_argument("--real-umap", action="store_true", help="fit the real UMAP (minutes at 100k) instead of PCA")
    args = parser.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="threeds-bench-")) / "cache"
    os.environ["THREEDS_CACHE"] = str(cache)
    setup = build(cache, args.n, args.dim, args.real_umap)
    m = args.moves
    lows = [float(v) for v in np.linspace(5, 45, m).round()]
    results, firsts = {}, {}

    at, firsts["Quality"] = open_page("app_pages/quality.py")
    results["Quality: threshold"] = timed_moves(at, "quality_threshold", [float(v) for v in np.linspace(60, 95, m).round()])

    at, firsts["Difficulty"] = open_page("app_pages/difficulty.py")
    results["Difficulty: ins_ppl band"] = timed_moves(at, "band_ins_ppl", [(lo, 75.0) for lo in lows])
    results["Difficulty: gt_wloss band"] = timed_moves(at, "band_gt_wloss", [(25.0, 100.0 - lo) for lo in lows])

    # Default bands (25-75 on each metric); k-center runs once for them, then the slider slices.
    ks = [int(v) for v in np.linspace(args.sample_num, args.sample_num // 2, m)]
    at, firsts["Embedding map (first k-center)"] = open_page("app_pages/embedding_map.py", sample_num=args.sample_num)
    results["Embedding map: sample_num"] = timed_moves(at, "sample_num", ks)

    at, firsts["Export"] = open_page("app_pages/export.py", sample_num=args.sample_num)
    results["Export: sample_num"] = timed_moves(at, "sample_num", [k - 1 for k in ks])

    at, firsts["Samples (table of every sample)"] = open_page("app_pages/samples.py", sample_num=args.sample_num)
    words = ["fever", "cough", "case 12", "asthma", "rest", "doctor", "gout", "case 9", "anemia", "migraine", "x"]
    results["Samples: text search"] = timed_moves(at, "samples_query", (words * m)[:m], widget="text_input")
    reasons = [[], ["quality"], ["Response Confidence above"], ["not among"]]
    results["Samples: reason filter"] = timed_moves(at, "samples_reason", (reasons * m)[:m], widget="multiselect")

    print(report(args, setup, firsts, results))
    return 0


def report(args, setup: dict, firsts: dict, results: dict) -> str:
    import streamlit
    import torch

    lines = [
        f"n={args.n:,} scored samples (+{args.n // 5:,} rated only), embeddings {args.n:,} x {args.dim} float32, "
        f"sample_num {args.sample_num}; {args.moves} moves per slider",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}), streamlit {streamlit.__version__}",
        f"setup: synthetic run {setup['build_run_s']:.1f} s, map ({'UMAP' if args.real_umap else 'PCA stand-in'}) {setup['map_s']:.1f} s; "
        f"load average at the end {os.getloadavg()[0]:.1f} (other work on the machine slows every figure)",
        "",
        "| slider | median ms | p90 ms | max ms |",
        "|---|---:|---:|---:|",
    ]
    for name, times in results.items():
        ms = sorted(t * 1000 for t in times)
        p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
        lines.append(f"| {name} | {statistics.median(ms):.0f} | {p90:.0f} | {ms[-1]:.0f} |")
    lines += ["", "| first render of a page (loads and caches) | s |", "|---|---:|"]
    lines += [f"| {name} | {t:.2f} |" for name, t in firsts.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
