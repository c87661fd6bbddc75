"""Memory and time at the paper's scale (issue 30): `threeds select`, the app's server, export.

Memory is read from /proc/PID/status every SAMPLE_S: RssAnon (the process's own memory: what
runs out) apart from RssFile (pages of mapped files, such as embeddings.npy, that the kernel
can drop at will), for the process and for it with its children (the app's background picks).
Each mode runs a checkout's own code: this one, or `--app-root /work/before --python
/work/before/.venv/bin/python` for the code before a change, so both are measured the same way.

- `select`: `threeds select` with the paper's settings (bands 25-75, 5,000 picks, quality >= 85)
  from a cold page cache (posix_fadvise DONTNEED on every file of the run) and then warm; see `select`.
- `app`: the app's server (bench/browser_latency.py starts it on a folder of links to the run,
  without the app's caches); headless Chromium opens each page and waits until it settles (an
  error page is reported, not timed away); the peak memory over all pages.
- `export`: the records of 5,000 picks read from data.jsonl and written in each export format.

    python bench/scale_memory.py select --run /work/scale/paper
    python bench/scale_memory.py select --run /work/scale/paper --app-root /work/before --python /work/before/.venv/bin/python
    python bench/scale_memory.py app --run /work/scale/paper
    python bench/scale_memory.py export --run /work/scale/paper
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from threeds.rundir import layout  # noqa: E402

SAMPLE_S = 0.1
PAPER = ["--sample-num", "5000", "--quality-threshold", "85"]  # bands 25-75 are the defaults
GiB = 2**30


def status_kb(pid: int) -> dict[str, int]:
    """RssAnon, RssFile (kB) of one process; {} once it has gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in text.splitlines()) if k in ("RssAnon", "RssFile")}


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*/children") if Path(f"/proc/{p}/task").exists() else []:
            try:
                kids = [int(k) for k in task.read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


class Sampler(threading.Thread):
    """Peak RssAnon / RssFile of `pid` alone and of it with its descendants, sampled every SAMPLE_S."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peak = {"anon": 0, "file": 0, "anon_tree": 0}

    def run(self) -> None:
        while not self.stop.is_set():
            own = status_kb(self.pid)
            if own:
                tree = sum(status_kb(p).get("RssAnon", 0) for p in descendants(self.pid)) + own["RssAnon"]
                self.peak["anon"] = max(self.peak["anon"], own["RssAnon"] * 1024)
                self.peak["file"] = max(self.peak["file"], own["RssFile"] * 1024)
                self.peak["anon_tree"] = max(self.peak["anon_tree"], tree * 1024)
            self.stop.wait(SAMPLE_S)

    def finish(self) -> dict:
        self.stop.set()
        self.join()
        return {k: round(v / GiB, 2) for k, v in self.peak.items()}


def drop_cache(run: Path) -> None:
    """Ask the kernel to drop the run's files from the page cache (no root needed)."""
    for path in run.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def select(args) -> dict:
    """`threeds select` on a folder of links to the run (the run itself is never written), each
    time without the k-center order a previous select left (pick_orders/), so every run picks:
    `first` from a cold page cache with nothing kept (the code after issue 30 makes data.jsonl's
    row index then), `cold` from a cold page cache, `warm` right after."""
    import browser_latency as bl

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = bl.shadow_run(args.run.resolve(), Path(tmp) / "runs", keep_map=True)
        for label in args.times.split(","):
            shutil.rmtree(run / layout.PICK_ORDERS, ignore_errors=True)
            for name in layout.DATA_INDEX if label == "first" else ():
                (run / name).unlink(missing_ok=True)
            if label != "warm":
                drop_cache(args.run.resolve())
            argv = [args.python, "-m", "threeds", "select", "--run", str(run), "--out", f"{tmp}/picked.json", *PAPER]
            began = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=args.app_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            sampler = Sampler(proc.pid)
            sampler.start()
            out = proc.communicate()[0]
            seconds = time.perf_counter() - began
            memory = sampler.finish()
            results[label] = {"seconds": round(seconds, 1), "exit": proc.returncode, **memory, "last_line": out.strip().splitlines()[-1:]}
            print(label, json.dumps(results[label]), flush=True)
            if proc.returncode != 0:
                break
    return results


def app(args) -> dict:
    import browser_latency as bl
    import test_browser

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    test_browser.free_port = lambda: args.port  # this engineer's ports, not any free one
    results: dict = {"pages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run = bl.shadow_run(args.run.resolve(), Path(tmp) / "cache", keep_map=True)
        drop_cache(args.run)
        proc, url, _ = bl.start_server(run.parent, args.app_root.resolve(), args.python)
        sampler = Sampler(proc.pid)
        sampler.start()
        options = webdriver.ChromeOptions()
        options.binary_location = str(test_browser.CHROMIUM)
        for flag in test_browser.FLAGS:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(test_browser.CHROMEDRIVER)), options=options)
        driver.set_page_load_timeout(bl.WAIT_S)
        try:
            for page in args.pages.split(","):
                began = time.perf_counter()
                try:
                    bl.visit(driver, f"{url}/{page}?run={run.name}", page)
                    shown = "ok"
                except (bl.PageFailed, RuntimeError) as exc:  # an error page, or not settled within WAIT_S
                    shown = str(exc)[:160]
                results["pages"][page] = {"seconds": round(time.perf_counter() - began, 1), "shown": shown,
                                          "anon_now": round(status_kb(proc.pid).get("RssAnon", 0) / 2**20, 2)}  # fmt: skip
                print(page, json.dumps(results["pages"][page]), flush=True)
        finally:
            driver.quit()
            results["peak"] = sampler.finish()
            proc.terminate()
            proc.wait(30)
    print("peak", json.dumps(results["peak"]))
    return results


def export(args) -> dict:
    import numpy as np

    from threeds.rundir.check import read_metrics, read_scored_records
    from threeds.rundir.layout import METRICS
    from threeds.views.export import FORMATS, export_text

    ids = read_metrics(args.run / METRICS)["id"].tolist()
    records = read_scored_records(args.run, ids)  # the row index, made once per run
    rows = np.random.default_rng(0).choice(len(ids), args.n, replace=False)
    drop_cache(args.run)
    results = {}
    for label in ("cold", "warm"):
        began = time.perf_counter()
        picked = records.take(rows)
        read_s = time.perf_counter() - began
        sizes = {fmt: len(export_text(picked, fmt)) for fmt in FORMATS}
        results[label] = {"read_s": round(read_s, 3), "read_and_write_s": round(time.perf_counter() - began, 3), "bytes": sizes}
        print(label, json.dumps(results[label]), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("select", "app", "export"))
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--app-root", type=Path, default=ROOT, help="the checkout whose code runs (default: this one)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs it (default: this one)")
    parser.add_argument("--pages", default="quality,difficulty,embedding_map,samples,export,inspector", help="app pages, comma-separated")
    parser.add_argument("--times", default="cold,warm", help="select: which runs, of first,cold,warm (default: cold,warm)")
    parser.add_argument("--n", type=int, default=5000, help="export: picks (default: 5,000)")
    parser.add_argument("--port", type=int, default=8531, help="app: the server's port (default: 8531)")
    args = parser.parse_args()
    print(f"load {os.getloadavg()[0]:.1f} · {args.mode} · {args.run} · code {args.app_root}", flush=True)
    {"select": select, "app": app, "export": export}[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
