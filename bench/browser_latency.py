"""Latency as a person feels it, in headless Chromium: page visits and control moves, each timed
to the last repaint after every spinner and background computation it started has finished.

Starts `streamlit run app.py` (of this checkout, or of --app-root with --python: the code before
a change) on a run and opens each page; per move it focuses a slider, presses one arrow key (a
real key event through chromedriver) and waits until the app is idle, no spinner shows, and the
page has not changed for QUIET_MS. A move's latency is the time from just before the key press to
the last DOM mutation (a MutationObserver; Plotly redraws count), leaving out the progress of
k-center picks made in the background (the panel `.st-key-picks_pending`, which the app redraws
every second while a job runs); the time until those picks are in, and the panel gone, is
reported apart ("picks ready"). Needs Debian's chromium and chromium-driver.

A first visit is timed from the browser's navigation start (performance.now()'s origin, through a
script Chromium runs before the page's own) to the first paint of the page's content (its title,
the h1, drawn by the page's script: the server has run the page's imports and started the page)
and to the last repaint. First visits are timed twice: cold (a server just started on a copy of the run without any of
the app's caches: no pick orders or presets (what Stage 2 leaves beside data.jsonl is kept); the map's umap.npy is kept unless
--cold-map, its time is `bench/map_scale.py`'s) and warm (a new browser session on the same
server, after the moves). The copy is a folder of symbolic links to the run's files, so a run of
many gigabytes costs nothing to copy and the run itself is never written.

The bench FAILS (exit status 1, naming the page and the message) as soon as a page shows an
exception or an error box: a page that failed is not a fast page.

    python bench/browser_latency.py                                  # the demo run, 9 moves per slider
    python bench/browser_latency.py --run /work/scale/paper --moves 7
    python bench/browser_latency.py --run /work/scale/paper --app-root /work/before --python /work/before/.venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from threeds.rundir import layout  # noqa: E402

QUIET_MS = 600
WAIT_S = 900  # the longest a page may take to settle (a cold map or k-center at the paper's shape)
PENDING = ".st-key-picks_pending"  # the background picks' panel (app_pages/common.pending_picks)
APP_CACHES = (layout.PICK_ORDERS, layout.PRESETS)  # left out of a cold copy (the row index, sources and A' checks: Stage 2 writes them)
MAP_CACHES = layout.UMAP
OBSERVER = """
window.__last = performance.now();
if (!window.__obs) {
  window.__obs = new MutationObserver((records) => {
    for (const r of records) {
      const node = r.target.nodeType === 1 ? r.target : r.target.parentElement;
      if (!node || !node.closest('%s')) { window.__last = performance.now(); return; }
    }
  });
  window.__obs.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
}
""" % PENDING
FIRST_CONTENT = """
window.__first = null;
new MutationObserver((records, observer) => {
  const h1 = document.querySelector('h1');
  if (h1 && h1.innerText.trim()) { window.__first = performance.now(); observer.disconnect(); }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""  # run by Chromium before the page's scripts: ms from navigation start to the page's title drawn
STATE = """
const text = (sel) => Array.from(document.querySelectorAll(sel)).map((e) => e.innerText.trim().split('\\n')[0]);
return {
  errors: [...text('[data-testid="stException"]'), ...text('[data-testid="stAlertContentError"]')],
  busy: document.querySelectorAll('[data-testid="stStatusWidget"], [data-testid="stSpinner"]').length,
  pending: document.querySelectorAll('%s').length,
  title: (document.querySelector('h1') || {}).innerText || '',
};
""" % PENDING


class PageFailed(RuntimeError):
    """A page showed an exception or an error box."""


def shadow_run(source: Path, folder: Path, keep_map: bool) -> Path:
    """`folder/<name>`: symbolic links to every file of the run but the app's caches."""
    target = folder / source.name
    target.mkdir(parents=True)
    skip = set(APP_CACHES) | (set() if keep_map else set(MAP_CACHES))
    for entry in source.iterdir():
        if entry.name not in skip and not entry.name.startswith("."):
            (target / entry.name).symlink_to(entry.resolve())
    return target


def start_server(cache: Path, app_root: Path, python: str) -> tuple[subprocess.Popen, str, float]:
    """The app's server on `cache`; (process, url, seconds until it answered)."""
    import test_browser

    port = test_browser.free_port()
    env = {**os.environ, "THREEDS_CACHE": str(cache)}
    argv = [python, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true"]
    began = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=app_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return proc, url, time.perf_counter() - began
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("streamlit did not start")


def page_state(driver, where: str) -> dict:
    """What the page shows now; PageFailed when that is an exception or an error."""
    found = driver.execute_script(STATE)
    if found["errors"]:
        raise PageFailed(f"{where}: the page shows an error: {found['errors'][0][:300]}")
    return found


def settle(driver, where: str, background: bool) -> float:
    """Wait until the app is idle, no spinner shows (nor, with `background`, the picks' panel) and
    nothing outside that panel changed for QUIET_MS; ms since the last such change."""
    deadline = time.time() + WAIT_S
    while True:
        state = page_state(driver, where)
        quiet = driver.execute_script("return performance.now() - window.__last")
        if not state["busy"] and not (background and state["pending"]) and quiet >= QUIET_MS:
            return quiet
        if time.time() > deadline:
            raise RuntimeError(f"{where}: not settled after {WAIT_S} s ({state})")
        time.sleep(0.05)


def timed(driver, act, where: str) -> tuple[float, float | None]:
    """(ms from just before `act()` to the last repaint outside the picks' panel, ms until the
    background picks it started were in; None when it started none)."""
    driver.execute_script(OBSERVER + "window.__t0 = performance.now();")  # just before: a slight overestimate
    act()
    time.sleep(0.2)
    settle(driver, where, background=False)
    latency = driver.execute_script("return window.__last - window.__t0")
    if not page_state(driver, where)["pending"]:
        return latency, None
    settle(driver, where, background=True)
    return latency, driver.execute_script("return performance.now() - window.__t0") - QUIET_MS


def move(driver, index: int, key: str, where: str) -> tuple[float, float | None]:
    """One key press on slider `index`."""
    import test_browser
    from selenium.webdriver.common.action_chains import ActionChains

    found = lambda d: d.find_elements("css selector", '[data-testid="stSlider"] input[type="range"]')[index:]  # noqa: E731
    thumb = test_browser.wait_for(driver, found, f"{where}: slider")[0]
    driver.execute_script("arguments[0].focus()", thumb)
    return timed(driver, lambda: ActionChains(driver).send_keys(key).perform(), where)


def search(driver, text: str) -> tuple[float, float | None]:
    """Samples: type `text` into the search box and press Enter."""
    import test_browser
    from selenium.webdriver.common.keys import Keys

    box = test_browser.wait_for(driver, lambda d: d.find_elements("css selector", 'input[aria-label^="Search instruction"]'), "search box")[0]
    box.clear()
    box.send_keys(text)
    return timed(driver, lambda: box.send_keys(Keys.ENTER), f"Samples search {text!r}")


def visit(driver, url: str, where: str) -> tuple[float, float]:
    """(ms from navigation start to the page's title drawn, ms to its last repaint, every spinner
    and background computation it started finished) for a page opened in a new session."""
    driver.get(url)
    driver.execute_script(OBSERVER)
    settle(driver, where, background=True)
    return driver.execute_script("return [window.__first, window.__last]")


def p90(values: list[float]) -> float:
    ms = sorted(values)
    return ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]


CONTROLS = (("quality", "Quality: threshold"), ("difficulty", "Difficulty: a band's low end"),
            ("embedding_map", "Embedding map: sample_num"), ("export", "Export: sample_num"))  # fmt: skip


def measure(driver, url: str, run: str, pages: list[str], moves: int) -> tuple[dict, dict, dict, dict]:
    """(cold first visits, control latencies, picks-ready times, warm first visits), in ms."""
    from selenium.webdriver.common.keys import Keys

    cold, results, ready, warm = {}, {}, {}, {}
    for page in pages:
        cold[page] = visit(driver, f"{url}/{page}?run={run}", f"{page} (first visit, cold)")
    for page, label in CONTROLS:
        if page not in pages:
            continue
        visit(driver, f"{url}/{page}?run={run}", page)
        left, right = Keys.ARROW_LEFT, Keys.ARROW_RIGHT
        keys = [left] * moves if "sample_num" in label else ([right, left] * moves)[:moves]
        timings = [move(driver, 0, key, label) for key in keys]
        results[label] = [t for t, _ in timings]
        if any(r is not None for _, r in timings):
            ready[label] = [r for _, r in timings if r is not None]
    if "samples" in pages:
        visit(driver, f"{url}/samples?run={run}", "samples")
        words = ["fever", "cough", "treatment", "case 1", "rest", "asthma", "doctor", "migraine", "fluids"]
        results["Samples: text search (Enter)"] = [search(driver, w)[0] for w in (words * 3)[:moves]]
    for page in pages:
        warm[page] = visit(driver, f"{url}/{page}?run={run}", f"{page} (first visit, warm)")
    return cold, results, ready, warm


def report(args, started_s: float, cold: dict, results: dict, ready: dict, warm: dict) -> None:
    print(f"run {args.run}, app {args.app_root}, {args.moves} moves per slider; load average {os.getloadavg()[0]:.1f}\n")
    print(f"server answered after {started_s:.1f} s\n")
    print("| control (browser: key press -> last repaint) | median ms | p90 ms | max ms |\n|---|---:|---:|---:|")
    for name, ms in results.items():
        print(f"| {name} | {statistics.median(ms):.0f} | {p90(ms):.0f} | {max(ms):.0f} |")
    if ready:
        print("\n| background k-center after a move (key press -> picks shown) | median ms | p90 ms | moves |\n|---|---:|---:|---:|")
        for name, ms in ready.items():
            print(f"| {name} | {statistics.median(ms):.0f} | {p90(ms):.0f} | {len(ms)} |")
    print("\n| page (ms from navigation start) | cold: title drawn | cold: last repaint | warm: title drawn | warm: last repaint |\n|---|---:|---:|---:|---:|")
    for page in cold:
        w = warm.get(page, (float("nan"), float("nan")))
        print(f"| {page} | {cold[page][0]:.0f} | {cold[page][1]:.0f} | {w[0]:.0f} | {w[1]:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "cache" / "demo", help="run directory to show (default: cache/demo)")
    parser.add_argument("--moves", type=int, default=9, help="key presses timed per slider (default: 9)")
    parser.add_argument("--pages", default="quality,difficulty,embedding_map,export,samples", help="pages to time, comma-separated (default: all five; outcomes: the Outcomes page)")
    parser.add_argument("--app-root", type=Path, default=ROOT, help="the checkout whose app.py runs (default: this one)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs it (default: this one)")
    parser.add_argument("--cold-map", action="store_true", help="leave the run's umap.npy out too (the first map visit computes it)")
    args = parser.parse_args()
    import test_browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    cache = Path(tempfile.mkdtemp(prefix="threeds-latency-")) / "cache"
    run = shadow_run(args.run.resolve(), cache, keep_map=not args.cold_map).name
    proc, url, started_s = start_server(cache, args.app_root.resolve(), args.python)
    options = webdriver.ChromeOptions()
    options.binary_location = str(test_browser.CHROMIUM)
    for flag in test_browser.FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(test_browser.CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FIRST_CONTENT})
    try:
        cold, results, ready, warm = measure(driver, url, run, args.pages.split(","), args.moves)
    except PageFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a server busy in a computation: its error above is what counts
            proc.kill()
            proc.wait()
    report(args, started_s, cold, results, ready, warm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
