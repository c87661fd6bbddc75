"""Slider latency as a person feels it: key release to the last repaint, in headless Chromium.

Starts `streamlit run app.py` on a copy of a run (default: the shipped demo, cache/demo), opens
a page in Chromium, and per move: focuses the slider, presses one arrow key (a real key event through chromedriver), and waits until the
app is idle and the page has not changed for QUIET_MS. The latency is the time from just before the
key press to the last DOM mutation (a MutationObserver in the page; Plotly redraws count, as they
change the SVG). Needs Debian's chromium and chromium-driver.

    python bench/browser_latency.py                    # the demo run, 9 moves per slider
    python bench/browser_latency.py --run cache/other --moves 15

It also times each page's first visit in that session (open to last repaint; the run is already
loaded by then, and the first visited page, Quality, also pays for loading it).
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

QUIET_MS = 600
OBSERVER = """
window.__last = performance.now();
if (!window.__obs) {
  window.__obs = new MutationObserver(() => { window.__last = performance.now(); });
  window.__obs.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
}
"""



def start_server(cache: Path) -> tuple[subprocess.Popen, str]:
    import test_browser

    port = test_browser.free_port()
    env = {**os.environ, "THREEDS_CACHE": str(cache)}
    argv = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("streamlit did not start")


def timed(driver, act) -> float:
    """ms from just before `act()` (a key event) to the last repaint after it."""
    import test_browser

    driver.execute_script(OBSERVER + "window.__t0 = performance.now();")  # just before: a slight overestimate
    act()
    time.sleep(0.2)
    test_browser.idle(driver)
    settle(driver)
    return driver.execute_script("return window.__last - window.__t0")


def settle(driver) -> float:
    """Wait until the page has not changed for QUIET_MS; ms since its last change."""
    while (quiet := driver.execute_script("return performance.now() - window.__last")) < QUIET_MS:
        time.sleep(0.05)
    return quiet


def move(driver, index: int, key: str) -> float:
    """One key press on slider `index`; ms from its release to the last repaint."""
    import test_browser
    from selenium.webdriver.common.action_chains import ActionChains

    found = lambda d: d.find_elements("css selector", '[data-testid="stSlider"] input[type="range"]')[index:]  # noqa: E731
    thumb = test_browser.wait_for(driver, found, "slider")[0]
    driver.execute_script("arguments[0].focus()", thumb)
    return timed(driver, lambda: ActionChains(driver).send_keys(key).perform())


def search(driver, text: str) -> float:
    """Samples: type `text` into the search box and press Enter; ms to the last repaint."""
    import test_browser
    from selenium.webdriver.common.keys import Keys

    box = test_browser.wait_for(driver, lambda d: d.find_elements("css selector", 'input[aria-label^="Search instruction"]'), "search box")[0]
    box.clear()
    box.send_keys(text)
    return timed(driver, lambda: box.send_keys(Keys.ENTER))


def first_visit(driver, url: str) -> float:
    """ms from opening a page to its last repaint (the app idle and no change for QUIET_MS)."""
    import test_browser

    began = time.perf_counter()
    driver.get(url)
    driver.execute_script(OBSERVER)
    test_browser.idle(driver)
    quiet = settle(driver)
    return (time.perf_counter() - began) * 1000 - quiet


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "cache" / "demo", help="run directory to copy and show (default: cache/demo)")
    parser.add_argument("--moves", type=int, default=9, help="key presses timed per slider (default: 9)")
    parser.add_argument("--pages", default="quality,difficulty,embedding_map,export,samples",
                        help="pages to time, comma-separated (default: all five)")  # fmt: skip
    args = parser.parse_args()
    import test_browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.keys import Keys

    cache = Path(tempfile.mkdtemp(prefix="threeds-latency-")) / "cache"
    cache.mkdir(parents=True)
    os.environ["THREEDS_SCREENSHOT_RUN"] = str(args.run)
    test_browser.prepare_cache(cache)  # a copy, with a PCA stand-in for UMAP when it has no umap.npy
    proc, url = start_server(cache)
    options = webdriver.ChromeOptions()
    options.binary_location = str(test_browser.CHROMIUM)
    for flag in test_browser.FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(test_browser.CHROMEDRIVER)), options=options)
    results, firsts, pages = {}, {}, args.pages.split(",")
    try:
        for page, slider, label in (("quality", 0, "Quality: threshold"), ("difficulty", 0, "Difficulty: a band's low end"),
                                    ("embedding_map", 0, "Embedding map: sample_num"), ("export", 0, "Export: sample_num")):  # fmt: skip
            if page not in pages:
                continue
            firsts[page] = first_visit(driver, f"{url}/{page}")
            time.sleep(1)
            left, right = Keys.ARROW_LEFT, Keys.ARROW_RIGHT
            keys = [left] * args.moves if "sample_num" in label else ([right, left] * args.moves)[: args.moves]
            results[label] = [move(driver, slider, key) for key in keys]
        if "samples" in pages:
            firsts["samples"] = first_visit(driver, f"{url}/samples")
            words = ["fever", "cough", "treatment", "case 1", "rest", "asthma", "doctor", "migraine", "fluids"]
            results["Samples: text search (Enter)"] = [search(driver, w) for w in (words * 3)[: args.moves]]
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=20)
    print(f"run {args.run.name}, {args.moves} moves per slider; load average {os.getloadavg()[0]:.1f}\n")
    print("| control (browser: key press -> last repaint) | median ms | p90 ms | max ms |\n|---|---:|---:|---:|")
    for name, ms in results.items():
        ms = sorted(ms)
        p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
        print(f"| {name} | {statistics.median(ms):.0f} | {p90:.0f} | {ms[-1]:.0f} |")
    print("\n| page | first visit, open to last repaint, ms |\n|---|---:|")
    for page, ms in firsts.items():
        print(f"| {page} | {ms:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
