"""The app in a real browser: `streamlit run app.py` on 127.0.0.1 driven by headless Chromium.

Goes through every page, moves a slider on each page that has one, clicks a point on the
embedding map, and saves a screenshot of each page: into THREEDS_SCREENSHOTS_DIR when set (the
README's images: THREEDS_SCREENSHOTS_DIR=docs/screenshots), else into pytest's temporary
directory, because Chromium's PNGs differ byte-wise from run to run and a plain test run should
not rewrite tracked files.
Needs Debian's `chromium` and `chromium-driver`. The run shown is a copy of the shipped demo run
(cache/demo), or of the run directory THREEDS_SCREENSHOT_RUN names, or a synthetic one when
neither exists.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from synthetic_run import make_experiment, make_run
from waiting import WAIT

from threeds.rundir import layout
from threeds.rundir.read import load_run
from threeds.views import embed_map

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1300", "--force-device-scale-factor=1",
]  # fmt: skip
TIMEOUT = WAIT  # a bound for a broken page, not a pace: a saturated machine takes minutes where a quiet one takes seconds

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()), reason="needs apt packages chromium and chromium-driver"),
]


def free_port() -> int:
    """THREEDS_BROWSER_PORT when set (sessions sharing a machine keep to their own ports), else a free one."""
    if os.environ.get("THREEDS_BROWSER_PORT"):
        return int(os.environ["THREEDS_BROWSER_PORT"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_cache(cache: Path) -> None:
    """The run to show, with its UMAP cache written beforehand (a real fit is tested elsewhere)."""
    source = Path(os.environ.get("THREEDS_SCREENSHOT_RUN", ROOT / "cache" / "demo"))
    if source.is_dir():
        shutil.copytree(source, cache / "demo")
    else:
        make_run(cache / "demo", n=300, n_dropped=60, dim=32)
    if not (cache / "demo" / "experiments").is_dir():
        make_experiment(cache / "demo")  # the Outcomes page's (the shipped demo has its own)
    run = load_run(cache / "demo")
    if not (cache / "demo" / layout.UMAP[0]).exists():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(embed_map, "compute_umap", lambda emb, settings=None: _spread(emb))
            embed_map.load_or_compute_umap(run.path, run.embeddings)


def _spread(emb: np.ndarray) -> np.ndarray:
    """A quick 2-D projection (top two principal axes) standing in for UMAP."""
    centred = emb - emb.mean(0)
    return (centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T).astype(np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("browser") / "cache"
    cache.mkdir()
    prepare_cache(cache)
    port = free_port()
    # candidates x dim above 40,000 are picked in the background: the demo's are not, a run of 512 dims is
    env = {**os.environ, "THREEDS_CACHE": str(cache), "THREEDS_INLINE_PICKS": "40000"}
    argv = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true"]
    log = open(cache.parent / "server.log", "wb")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + TIMEOUT
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError((cache.parent / "server.log").read_text())
                time.sleep(0.3)
        yield url, cache
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:  # the server did not stop: end it, so the next test's port is free
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request, for `requested_urls`
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RUNS_HOOK})
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, TIMEOUT, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(lambda d: condition(d), message=what)  # elements go stale as Streamlit redraws


def body_text(driver) -> str:
    return driver.execute_script("return document.body.innerText")


# Counts the script runs that ended, read from the server's messages as they arrive (ForwardMsg
# protobufs: field 6 `script_finished`, whose value 2 is a run cut short by a rerun; field 9
# `session_status_changed`, its field 2 `script_is_running`). The app root's data-test-script-state
# cannot count them: React may render `running` and `notRunning` in one commit, so a short run under
# load never shows, and a rerun asked for during a run merges into it. Installed before the page's
# own scripts (`browser`), for every page the tab loads.
RUNS_HOOK = """(() => {
window.threedsRuns = {ended: 0, running: false};
const varint = (b, at) => { let v = 0, shift = 0, c; do { c = b[at++]; v += (c & 0x7f) * 2 ** shift; shift += 7; } while (c & 0x80); return [v, at]; };
const fields = (b, seen) => { let at = 0; while (at < b.length) {
  let key, v; [key, at] = varint(b, at);
  const field = Math.floor(key / 8), wire = key % 8;
  if (wire === 0) { [v, at] = varint(b, at); seen(field, v); }
  else if (wire === 2) { [v, at] = varint(b, at); seen(field, b.subarray(at, at + v)); at += v; }
  else if (wire === 1 || wire === 5) at += wire === 1 ? 8 : 4;
  else return;
} };
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  constructor(...args) {
    super(...args);
    this.addEventListener('message', event => {
      if (!(event.data instanceof ArrayBuffer)) return;
      fields(new Uint8Array(event.data), (field, value) => {
        if (field === 6 && value !== 2) window.threedsRuns.ended += 1;
        if (field === 9) { let running = false; fields(value, (f, v) => { if (f === 2) running = v === 1; }); window.threedsRuns.running = running; }
      });
    });
  }
};
})();"""


def app_state(driver) -> tuple[str | None, dict | None]:
    """The app root's script state and the runs counted from the server's messages (`RUNS_HOOK`)."""
    return tuple(driver.execute_script(
        "return [document.querySelector('[data-testid=\"stApp\"]')?.getAttribute('data-test-script-state'), window.threedsRuns];"
    ))  # fmt: skip


def quiet(state: str | None, counted: dict | None) -> bool:
    """No run under way, as the server last said and as the page shows."""
    return state == "notRunning" and counted is not None and not counted["running"]


def runs(driver) -> int:
    """Script runs (whole or fragment) that ended since the page loaded, read when no run is under
    way: a count taken during a run would already hold it."""
    return wait_for(driver, lambda d: quiet(*(now := app_state(d))) and now[1]["ended"] + 1, "the app idle, its runs counted") - 1


def idle(driver, since: int | None = None) -> None:
    """Wait until the script run finished: the server and the app's root say no run is under way and
    no status widget shows; with `since` (`runs` before an action that reruns the script), until a
    run ended after it too, so a rerun that has not started yet is not taken for idle."""
    from selenium.common.exceptions import TimeoutException

    def settled(d) -> bool:
        state, counted = app_state(d)
        return (quiet(state, counted) and (since is None or counted["ended"] > since)
                and not d.find_elements("css selector", '[data-testid="stStatusWidget"]'))  # fmt: skip

    try:
        wait_for(driver, settled, "app idle")
    except TimeoutException:  # say what was seen: a run never begun, one never ended, a status shown
        status = [e.text for e in driver.find_elements("css selector", '[data-testid="stStatusWidget"]')]
        raise AssertionError(f"app not idle: script state and runs {app_state(driver)} (since {since}), status widget {status}") from None


def metrics(driver) -> dict[str, str]:
    found = {}
    for element in driver.find_elements("css selector", '[data-testid="stMetric"]'):
        name = element.find_element("css selector", '[data-testid="stMetricLabel"]').text.strip()
        found[name] = element.find_element("css selector", '[data-testid="stMetricValue"]').text.strip()
    return found


def metric(driver, label: str) -> str:
    """The value shown under `label`, waiting for it to be drawn."""
    return wait_for(driver, lambda d: metrics(d).get(label), f"metric {label!r}")


def go(driver, title: str) -> None:
    """Open a page through the sidebar navigation (keeps the session, like a user)."""
    idle(driver)
    link = next(a for a in driver.find_elements("css selector", '[data-testid="stSidebarNavLink"]') if a.text.strip().endswith(title))
    before = runs(driver)
    link.click()
    wait_for(driver, lambda d: any(h.text.strip() == title or h.text.startswith(title) for h in d.find_elements("css selector", "h1")), f"page {title}")
    idle(driver, before)


def requested_urls(driver) -> set[str]:
    """URLs the page requested since the last call (Chromium's network log)."""
    found = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            found.add(message["params"]["request"]["url"])
    return found


def outside(urls: set[str]) -> set[str]:
    """The network URLs that leave this machine (data:, blob: and chrome: URLs never touch the network)."""
    from urllib.parse import urlsplit

    return {u for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss") and urlsplit(u).hostname != "127.0.0.1"}


def pick_radio(driver, label: str, option: str) -> None:
    def group(d):
        return next((r for r in d.find_elements("css selector", '[data-testid="stRadio"]') if r.text.startswith(label)), None)

    idle(driver)
    choice = next(o for o in wait_for(driver, group, f"radio {label}").find_elements("css selector", "label") if o.text.strip() == option)
    before = None if any(i.is_selected() for i in choice.find_elements("css selector", "input")) else runs(driver)  # a new choice reruns
    choice.click()
    idle(driver, before)


def nudge_slider(driver, index: int, key: str, times: int) -> None:
    """Move the `index`-th slider thumb on the page with the keyboard, as a user can."""
    from selenium.webdriver.common.action_chains import ActionChains

    idle(driver)
    thumb = wait_for(driver, lambda d: d.find_elements("css selector", '[data-testid="stSlider"] input[type="range"]')[index:], "slider")[0]
    driver.execute_script("arguments[0].focus()", thumb)
    value, before = thumb.get_attribute("value"), runs(driver)
    ActionChains(driver).send_keys(key * times).perform()
    idle(driver, before if thumb.get_attribute("value") != value else None)  # a moved thumb reruns (once its debounce ends)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("THREEDS_SCREENSHOTS_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


DRAWN = """
return Array.from(document.querySelectorAll('.js-plotly-plot')).every(p => p._fullLayout && p.querySelector('.main-svg')
  && !(p._transitionData && p._transitionData._frameQueue && p._transitionData._frameQueue.length))
  && Array.from(document.images).every(i => i.complete);
"""


def shot(driver, folder: Path, name: str) -> None:
    idle(driver)
    wait_for(driver, lambda d: d.execute_script(DRAWN), "every chart and image drawn")
    driver.save_screenshot(str(folder / f"{name}.png"))
    assert (folder / f"{name}.png").stat().st_size > 10_000  # a drawn page, not a blank one


def test_every_page_in_chromium(server, browser, shots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    url, _ = server
    d = browser
    requested_urls(d)  # what Chromium itself requested at startup is not the app's
    d.get(url)
    wait_for(d, lambda d: "Start a new run" in body_text(d), "Runs page")
    idle(d)
    assert metric(d, "scored (Stage 2)") != "—"
    shot(d, shots, "runs")

    go(d, "Quality")
    before = metric(d, "kept")
    nudge_slider(d, 0, Keys.ARROW_RIGHT, 10)  # raise the threshold by 10 points
    wait_for(d, lambda d: metric(d, "kept") != before, "kept count changes with the threshold")
    shot(d, shots, "quality")
    nudge_slider(d, 0, Keys.ARROW_LEFT, 10)  # back: the threshold now reaches every page
    wait_for(d, lambda d: metric(d, "kept") == before, "kept count back")

    go(d, "Difficulty")
    before = metric(d, "in all three bands")
    nudge_slider(d, 0, Keys.ARROW_LEFT, 15)  # the low end of Instruction Understanding's band
    wait_for(d, lambda d: metric(d, "in all three bands") != before, "intersection changes with a band")
    wait_for(d, lambda d: len(d.find_elements("css selector", ".js-plotly-plot")) == 4, "three histograms + scatter matrix")  # drawn after the script run
    shot(d, shots, "difficulty")

    go(d, "Embedding map")
    nudge_slider(d, 0, Keys.ARROW_LEFT, 2)
    wait_for(d, lambda d: "k-center picks" in body_text(d), "map caption")
    shot(d, shots, "embedding_map")
    x, y = d.execute_script(
        """
        const gd = document.querySelector('.js-plotly-plot');
        const trace = gd._fullData[gd._fullData.length - 1];
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, box = gd.getBoundingClientRect();
        return [box.left + xa._offset + xa.l2p(trace.x[0]), box.top + ya._offset + ya.l2p(trace.y[0])];
        """
    )
    ActionChains(d).move_by_offset(int(x), int(y)).click().perform()
    wait_for(d, lambda d: "Sample inspector" in [h.text.strip() for h in d.find_elements("css selector", "h1")], "click opens the inspector")
    idle(d)
    wait_for(d, lambda d: len(d.find_elements("css selector", "span[title*='contribution']")) > 0, "token heatmaps")
    check_heatmaps(d)
    shot(d, shots, "inspector")

    go(d, "Export")
    wait_for(d, lambda d: "threeds select --run" in body_text(d), "the reproducing command")
    before = metric(d, "selected samples")
    nudge_slider(d, 0, Keys.ARROW_LEFT, 3)
    wait_for(d, lambda d: metric(d, "selected samples") != before, "selection size follows sample_num")
    shot(d, shots, "export")
    assert not outside(requested_urls(d)), "the app fetched something from the internet"


def heatmap_boxes(driver) -> list:
    """The two heatmap boxes (A, A'): the scrolling divs that hold the token spans."""
    return [b for b in driver.find_elements("css selector", "div[style*='overflow-y']") if b.find_elements("css selector", "span[title]")]


def read_heatmaps(d):
    """(boxes, first non-function-word span of A, box heights), or None while the page re-renders."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        boxes = heatmap_boxes(d)
        if len(boxes) != 2:
            return None
        spans = boxes[0].find_elements("css selector", "span[title]")
        coloured = next(s for s in spans if "function word: no" in s.get_attribute("title"))
        return boxes, coloured, [b.size["height"] for b in boxes]
    except StaleElementReferenceException:
        return None


def check_heatmaps(d) -> None:
    """Three views with their own colours and legends; hover text; long answers scroll in a box."""
    backgrounds = {}
    for view in ("attention weight", "loss", "contribution"):
        pick_radio(d, "Heatmap", view)
        idle(d)  # the selection's URL sync may re-render the page once more: read what stays
        boxes, coloured, heights = wait_for(d, lambda d: read_heatmaps(d), f"{view}: A and A'")
        backgrounds[view] = coloured.value_of_css_property("background-color").rsplit(",", 1)[0]
        assert all(h <= 22 * 16 + 40 for h in heights)  # fixed height, whatever the length
        assert "clipped" in d.execute_script("return document.body.innerText")  # the legend
    assert len(set(backgrounds.values())) == 3, backgrounds
    tip = coloured.get_attribute("title")
    for part in ("loss ", "weight share ", "contribution ", "function word: "):
        assert part in tip, tip


def type_into(driver, label: str, text: str, kind: str = "stTextInput") -> None:
    """Type into the text (or `kind`) input labelled `label` and leave it (Tab commits it, like a user)."""
    from selenium.webdriver.common.keys import Keys

    def box(d):
        return next((b for b in d.find_elements("css selector", f'[data-testid="{kind}"]') if b.text.strip().startswith(label)), None)

    idle(driver)
    field = wait_for(driver, box, f"text input {label}").find_element("css selector", "input")
    changed, before = field.get_attribute("value") != text, runs(driver)
    field.send_keys(Keys.CONTROL, "a")  # replace what is there (clear() bypasses React's state)
    field.send_keys(text + Keys.TAB)
    idle(driver, before if changed else None)  # a changed value, committed, reruns the script


def test_a_run_started_on_the_page_updates_live_and_ends_failed(server, browser, tmp_path, shots):
    """Start a run from the form (Stage 1 and A' from a slow fake server, for Stage 2 a model folder
    whose weights are broken, which only loading finds): the same page shows the counts and progress
    moving and then the failure, with no reload. A model path that does not exist keeps Start off."""
    from fake_openai_server import FakeOpenAIServer

    url, _ = server
    d = browser
    data = tmp_path / "six.jsonl"
    rows = [{"id": f"q{i}", "instruction": f"Question {i} [[q{i};sleep={1.2 * i}]]: why do I cough at night?",
             "output": "Often postnasal drip or asthma."} for i in range(6)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"not safetensors")

    def reply(content: str) -> str:
        return "Score: 90" if "Reply with the number only" in content else "Rest and fluids."

    with FakeOpenAIServer(default_reply=reply) as fake:
        d.get(url)
        wait_for(d, lambda d: "Start a new run" in body_text(d), "Runs page")
        idle(d)
        requested_urls(d)
        pick_radio(d, "Data", "Path on this machine")
        type_into(d, "Data file", str(data))
        idle(d)
        type_into(d, "Run name", "live")
        type_into(d, "Model", str(tmp_path / "no-such-model"))
        wait_for(d, lambda d: "Model: no such file or directory" in body_text(d), "the model checked before the run starts")
        type_into(d, "Model", str(broken))
        pick_radio(d, "Stage 1 rating", "openai")
        type_into(d, "OpenAI-compatible base URL", fake.base_url)
        type_into(d, "Band low %", "80", kind="stNumberInput")  # above the high end: Start says why it is off
        type_into(d, "Band high %", "20", kind="stNumberInput")
        wait_for(d, lambda d: "Band low %: above --up-th 20" in body_text(d), "the band's problem")
        start = next(b for b in d.find_elements("css selector", "button") if b.text.strip() == "Start run")
        assert not start.is_enabled() and "Start is disabled until these are fixed" in body_text(d)
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", start)
        shot(d, shots, "runs_form_check")
        type_into(d, "Band high %", "90", kind="stNumberInput")
        wait_for(d, lambda d: "Start is disabled" not in body_text(d), "the form fixed")
        d.execute_script("window.notReloaded = true")
        next(b for b in d.find_elements("css selector", "button") if b.text.strip() == "Start run").click()
        seen, counts = set(), set()
        deadline = time.time() + TIMEOUT
        while "Failed (exit code" not in body_text(d) and time.time() < deadline:
            bars = d.find_elements("css selector", '[data-testid="stProgress"]')
            seen.update(b.text.split(" · ")[0].split(" (")[0] for b in bars if b.text)
            counts.add(metrics(d).get("rated (Stage 1)"))
            time.sleep(0.3)
    text = body_text(d)
    assert "Failed (exit code 1)" in text and "broken-model" in text, text[-2000:]
    assert d.execute_script("return window.notReloaded === true")  # all of it on the page that started it
    rated = sorted(s for s in seen if s.startswith("rate:"))
    assert len(rated) >= 2 and "rate: 6 / 6 records" not in rated[:1], seen  # counts moved while it ran
    # the stage counts too, not only after a reload: values before the last one, then all 6
    assert "6" in counts and counts & {"—", "0", "1", "2", "3", "4", "5"}, counts
    assert "python" in text and "--data" in text and str(data) in text  # the full command, wrapped
    assert not outside(requested_urls(d)), "the app fetched something from the internet"


def slider_values(driver) -> list[str]:
    return [t.get_attribute("value") for t in driver.find_elements("css selector", '[data-testid="stSlider"] input[type="range"]')]


def test_url_reload_and_pasted_link(server, browser, shots):
    """Issue 11 (2): threshold + band -> reload -> same state; a pasted /inspector?run=...&id=...
    link opens that run's sample with the link's selection."""
    from selenium.webdriver.common.keys import Keys

    url, cache = server
    d = browser
    d.get(f"{url}/quality")
    idle(d)
    nudge_slider(d, 0, Keys.ARROW_RIGHT, 5)  # threshold + 5
    go(d, "Difficulty")
    nudge_slider(d, 0, Keys.ARROW_RIGHT, 5)  # Instruction Understanding's low end + 5
    wait_for(d, lambda d: "ins_low=30" in d.current_url, "the band in the URL")
    link, inside, sliders = d.current_url, metric(d, "in all three bands"), slider_values(d)
    assert "quality_threshold=" in link and "/difficulty?" in link
    d.refresh()
    wait_for(d, lambda d: metric(d, "in all three bands") == inside, "same intersection after a reload")
    wait_for(d, lambda d: slider_values(d) == sliders, "the same sliders after a reload")  # the panels draw after the counts
    assert len(sliders) == 6 and d.current_url == link  # two thumbs per band
    sample = load_run(cache / "demo").metrics["id"].iloc[3]
    d.get(f"{url}/inspector?run=demo&quality_threshold=90&low_th=10&id={sample}")  # a new session, as a pasted link
    wait_for(d, lambda d: f"{sample}" in body_text(d) and "selection:" in body_text(d), "the link's sample")
    idle(d)
    assert "kept by quality" in body_text(d)
    shot(d, shots, "inspector_link")
    go(d, "Export")
    wait_for(d, lambda d: "--low-th 10 --up-th 75 " in body_text(d) and "--quality-threshold 90" in body_text(d), "the link's selection reaches Export")


def test_back_and_forward_restore_a_pages_settings(server, browser):
    """Issue 11 (2): each committed change is a browser history entry; back and forward on one
    page bring its settings back (sliders, numbers and URL)."""
    from selenium.webdriver.common.keys import Keys

    url, _ = server
    d = browser
    d.get(f"{url}/difficulty?run=demo")
    idle(d)
    nudge_slider(d, 0, Keys.ARROW_RIGHT, 5)  # Instruction Understanding's low end: 25 -> 30
    wait_for(d, lambda d: "ins_low=30" in d.current_url, "the first change in the URL")
    idle(d)  # every rerun of the five presses done before the first entry is recorded
    first, first_sliders, first_kept = d.current_url, slider_values(d), metric(d, "in all three bands")
    # one key press: several would each commit (and push) an intermediate value when the reruns are
    # not coalesced, and back would then stop at one of those
    nudge_slider(d, 0, Keys.ARROW_RIGHT, 1)  # 30 -> 31
    wait_for(d, lambda d: "ins_low=31" in d.current_url, "the second change in the URL")
    idle(d)
    second, second_sliders, second_kept = d.current_url, slider_values(d), metric(d, "in all three bands")
    assert second_sliders != first_sliders
    d.back()
    wait_for(d, lambda d: slider_values(d) == first_sliders, "back: the first change's sliders")
    idle(d)
    assert d.current_url == first and metric(d, "in all three bands") == first_kept
    d.forward()
    wait_for(d, lambda d: slider_values(d) == second_sliders, "forward: the second change's sliders")
    idle(d)
    assert d.current_url == second and metric(d, "in all three bands") == second_kept


def lasso_on_the_map(d) -> None:
    """Draw a closed lasso over the middle of the embedding map and wait for its brush."""
    from selenium.webdriver.common.action_chains import ActionChains

    plot = wait_for(d, lambda d: d.find_elements("css selector", ".js-plotly-plot .nsewdrag"), "the map")[0]
    ActionChains(d).move_to_element(plot).perform()  # the mode bar shows on hover
    d.execute_script("document.querySelector('.js-plotly-plot .modebar-btn[data-val=\"lasso\"]').click()")  # lasso select
    w, h = plot.size["width"], plot.size["height"]
    lasso = ActionChains(d).move_to_element_with_offset(plot, -w // 3, -h // 3).click_and_hold()
    for dx, dy in ((w // 2, h // 10), (w // 6, h // 2), (-w // 3, h // 6), (-w // 3, -h // 3)):  # a closed polygon
        lasso = lasso.move_by_offset(dx // 2, dy // 2).move_by_offset(dx - dx // 2, dy - dy // 2)
    lasso.release().perform()
    wait_for(d, lambda d: "points from a box/lasso on the map" in body_text(d), "the lasso's brush")


def url_setting(d, name: str) -> str | None:
    from urllib.parse import parse_qs, urlsplit

    return parse_qs(urlsplit(d.current_url).query).get(name, [None])[0]


def test_a_visit_or_a_brush_on_the_map_never_changes_sample_num(server, browser):
    """Issue 25 (5): opening the map with sample_num above its candidates keeps sample_num (was
    clamped); after a slider move and a lasso, every page, the URL, the sidebar and Export say
    the same sample_num (a brush then a page change moved it 4 -> 6)."""
    from selenium.webdriver.common.keys import Keys

    url, _ = server
    d = browser
    d.get(f"{url}/embedding_map?run=demo&sample_num=9999")  # a new session from a link
    caption = wait_for(d, lambda d: next((x for x in body_text(d).splitlines() if "candidates" in x), None), "map caption")
    idle(d)
    candidates = int(caption.split(" candidates")[0].split()[-1].replace(",", ""))
    assert url_setting(d, "sample_num") == "9999" and slider_values(d) == [str(candidates)]
    nudge_slider(d, 0, Keys.ARROW_LEFT, 2)
    wanted = str(candidates - 2)
    wait_for(d, lambda d: url_setting(d, "sample_num") == wanted, "the slider's move in the URL")
    lasso_on_the_map(d)
    idle(d)
    wait_for(d, lambda d: url_setting(d, "brush"), "the brush in the URL (issue 25 (6))")
    brush = url_setting(d, "brush")
    for page in ("Samples", "Difficulty", "Embedding map", "Samples", "Export"):
        go(d, page)  # the frontend clears the query string on a page change; the run writes it back at its end
        wait_for(d, lambda d: (url_setting(d, "sample_num"), url_setting(d, "brush")) == (wanted, brush), f"{page}: the URL")
        sidebar = d.find_element("css selector", '[data-testid="stSidebar"]').text
        assert f"picked {wanted}" in " ".join(sidebar.split()), (page, sidebar)
    wait_for(d, lambda d: f"--sample-num {wanted} " in body_text(d), "Export's command")
    assert metric(d, "selected samples") == wanted and slider_values(d) == [wanted]


def test_lasso_on_the_map_filters_the_samples_table_and_compare(server, browser, shots):
    """Issue 11 (4, 3, 5): a lasso drawn on the map brushes points; Samples shows only those;
    a row opens the inspector; Compare draws two selections."""
    url, _ = server
    d = browser
    d.get(f"{url}/embedding_map")
    idle(d)
    lasso_on_the_map(d)
    wait_for(d, lambda d: "unbrushed points greyed" in body_text(d), "the brush")
    idle(d)
    shot(d, shots, "embedding_map_brush")
    go(d, "Samples")
    text = wait_for(d, lambda d: next((line for line in body_text(d).splitlines() if " samples match" in line), None), "table caption")
    matched, total = (int(x.replace(",", "")) for x in text.split(" samples match")[0].split(" of "))
    assert 0 < matched < total and "Brushed:" in body_text(d)
    shot(d, shots, "samples")
    d.refresh()  # the brush is in the URL (issue 25 (6)): a reload shows the same rows
    wait_for(d, lambda d: f"{matched:,} of {total:,} samples match" in body_text(d), "the same brush after a reload")
    go(d, "Compare")
    wait_for(d, lambda d: "picked by both" in body_text(d), "compare page")
    shot(d, shots, "compare")


def test_a_box_on_the_scatter_matrix_brushes_the_samples_table(server, browser):
    """Issue 11 (4): a box dragged on a panel of the scatter matrix filters Samples to the samples
    inside it."""
    from selenium.webdriver.common.action_chains import ActionChains

    url, _ = server
    d = browser
    d.get(f"{url}/difficulty")
    idle(d)
    def panels(d):  # the fourth chart, below the three histograms, once Plotly has drawn its panels
        charts = d.find_elements("css selector", '[data-testid="stPlotlyChart"]')
        return len(charts) == 4 and [p for p in charts[3].find_elements("css selector", ".nsewdrag") if p.size["height"] > 50]

    panel = wait_for(d, panels, "the scatter matrix")[-1]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", panel)
    w, h = panel.size["width"], panel.size["height"]
    ActionChains(d).move_to_element_with_offset(panel, -w // 2 + 3, -h // 2 + 3).click_and_hold().move_by_offset(w // 2, h // 2).move_by_offset(w // 2 - 6, h // 2 - 6).release().perform()
    wait_for(d, lambda d: "on the scatter matrix" in body_text(d), "the scatter matrix's brush")
    idle(d)
    go(d, "Samples")
    text = wait_for(d, lambda d: next((line for line in body_text(d).splitlines() if " samples match" in line), None), "table caption")
    matched, total = (int(x.replace(",", "")) for x in text.split(" samples match")[0].split(" of "))
    assert 0 < matched <= total and "on the scatter matrix" in body_text(d)


def test_a_lasso_on_an_image_map_brushes_every_point_inside(server, browser):
    """Issue 11 (7): above 1,500 points the map is an image with 120 hoverable markers; a lasso
    still brushes every point inside it, drawn as a marker or not. Runs last: it adds a run."""
    from selenium.webdriver.common.action_chains import ActionChains

    url, cache = server
    large = make_run(cache / "large", n=2_000, n_dropped=10, dim=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embed_map, "compute_umap", lambda emb, settings=None: _spread(emb))
        embed_map.load_or_compute_umap(large, load_run(large).embeddings)
    d = browser
    d.get(f"{url}/embedding_map?run=large")
    idle(d)
    wait_for(d, lambda d: "drawn as an image" in body_text(d), "the image map")
    wait_for(d, lambda d: d.find_elements("css selector", ".js-plotly-plot image"), "the map's image")
    plot = wait_for(d, lambda d: d.find_elements("css selector", ".js-plotly-plot .nsewdrag"), "the map")[0]
    ActionChains(d).move_to_element(plot).perform()
    d.execute_script("document.querySelector('.js-plotly-plot .modebar-btn[data-val=\"lasso\"]').click()")
    w, h = plot.size["width"], plot.size["height"]
    lasso = ActionChains(d).move_to_element_with_offset(plot, -w // 2 + 5, -h // 2 + 5).click_and_hold()
    for dx, dy in ((w - 10, 0), (0, h - 10), (-(w - 10), 0), (0, -(h - 10))):  # the whole plot area
        lasso = lasso.move_by_offset(dx // 2, dy // 2).move_by_offset(dx - dx // 2, dy - dy // 2)
    lasso.release().perform()
    label = wait_for(d, lambda d: next((line for line in body_text(d).splitlines() if "points from a box/lasso" in line), None), "the brush")
    brushed = int(label.split("Brushed: ")[-1].split(" points")[0].replace(",", ""))
    assert brushed > 1_500  # far more than the 120 markers: every point inside, drawn or not


def test_large_picks_are_made_in_the_background_and_the_page_says_so(server, browser):
    """Issue 30 (4): picks over many candidates come from a background job; Export says they are
    coming (with the job's progress) and shows them when they are in, with no reload."""
    url, cache = server
    make_run(cache / "bg", n=1_500, n_dropped=10, dim=512)
    d = browser
    d.get(f"{url}/difficulty?run=bg&sample_num=40")
    idle(d)
    d.execute_script("""
        window.sawComing = false; window.notReloaded = true;
        new MutationObserver(() => { if (document.body.innerText.includes('are coming')) window.sawComing = true; })
            .observe(document.body, {subtree: true, childList: true, characterData: true});
    """)  # fmt: skip
    go(d, "Export")
    wait_for(d, lambda d: metrics(d).get("selected samples") not in (None, "coming"), "the picks arrive")
    assert d.execute_script("return window.sawComing && window.notReloaded")
    assert metric(d, "selected samples") == "40" and "are coming" not in body_text(d)
    wait_for(d, lambda d: "--sample-num 40 " in body_text(d), "the command once the picks are in")


def test_outcomes_page_shows_the_experiment_and_an_item_on_click(server, browser, shots):
    """The shipped demo experiment (or a synthetic one): the arms, the charts, the honest caveats;
    a click on a disagreeing item shows its prompt and each arm's probabilities."""
    from selenium.webdriver.common.action_chains import ActionChains

    from threeds.outcomes import report
    from threeds.outcomes.results import list_experiments, load_results

    url, cache = server
    d = browser
    d.get(url)
    wait_for(d, lambda d: "Start a new run" in body_text(d), "Runs page")
    idle(d)
    requested_urls(d)
    go(d, "Outcomes")
    wait_for(d, lambda d: "Items where the arms disagree" in body_text(d), "the experiment's results")
    idle(d)
    wait_for(d, lambda d: len(d.find_elements("css selector", ".js-plotly-plot")) == 2, "accuracy with error bars, loss curves")  # drawn after the script run
    text = body_text(d)
    assert "SmolLM2-135M" in text and "Tiny training sets" in text
    shot(d, shots, "outcomes")
    exp = cache / "demo" / "experiments" / list_experiments(cache / "demo")[0]
    evals = load_results(exp).evals
    first = report.disagreements(evals)[0]["id"]
    question = max(report.item_detail(evals, first)["prompt"].splitlines(), key=len)  # a line the code block shows
    grid = d.find_elements("css selector", '[data-testid="stDataFrame"]')[-1]  # the disagreeing items
    size = grid.size
    ActionChains(d).move_to_element_with_offset(grid, -size["width"] // 2 + 18, -size["height"] // 2 + 35 + 17).click().perform()
    wait_for(d, lambda d: question[:40] in body_text(d), "the clicked item's prompt")
    idle(d)
    shot(d, shots, "outcomes_item")
    assert not outside(requested_urls(d)), "the app fetched something from the internet"


def test_a_pasted_outcomes_link_opens_its_experiment_and_item(server, browser):
    """Issue 31 (3): a link naming a run's older experiment and one of its items, opened in a new
    session, shows that experiment (not the newest, the page's default) with that item open."""
    from threeds.outcomes.results import list_experiments

    url, cache = server
    d = browser
    run_dir = cache / "linked"
    make_run(run_dir, n=20, n_dropped=4)
    linked = make_experiment(run_dir, "older-one", question="Which nerve supplies muscle")
    make_experiment(run_dir, "newest-one", question="Which virus causes case")
    os.utime(linked, (1e9, 1e9))  # listed last: the page opens the newest unless the link says otherwise
    assert list_experiments(run_dir) == ["newest-one", "older-one"]
    d.get(f"{url}/outcomes?run=linked&experiment=older-one&item=q4")  # a new session, as a pasted link
    wait_for(d, lambda d: "Which nerve supplies muscle 4?" in body_text(d), "the linked experiment's item, opened")
    idle(d)
    text = body_text(d)
    shown = {label: d.find_element("css selector", f'[data-testid="stSelectbox"] input[aria-label="{label}"]').get_attribute("value")
             for label in ("Run", "Experiment")}  # the pickers, as a person reads them
    assert shown == {"Run": "linked", "Experiment": "older-one"}, shown
    assert "Item q4: the prompt exactly as the model read it" in text and "Which virus" not in text
    assert "experiment=older-one" in d.current_url and "item=q4" in d.current_url


def test_retry_that_fixes_nothing_and_a_pasted_samples_link(server, browser, tmp_path):
    """Retry on a run done with failures whose retry stops again (its input is gone) keeps the amber
    state and the failed records and says why; a pasted Samples link with a verdict filter and a sort
    shows the rows it names."""
    from threeds.rundir.progress import write_status

    url, cache = server
    d = browser
    run_dir = cache / "retry"
    make_run(run_dir, n=20, n_dropped=4)
    failures = {"rate": {"failed": 1, "total": 24, "log": str(run_dir / "ratings.jsonl"), "first": [{"id": "s000002", "error": "no score"}]}}
    write_status(run_dir, "done_with_failures", exit_code=3, error="done with failures: 1 of 24 ratings failed", failures=failures)
    gone = tmp_path / "gone.jsonl"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    argv = [sys.executable, "-m", "threeds", "run", "--data", str(gone), "--out", str(run_dir)]
    (run_dir / layout.JOB).write_text(json.dumps({"pid": int(ended.stdout), "argv": argv, "started": time.time()}))
    d.get(f"{url}/?run=retry")
    wait_for(d, lambda d: "Done with failures (exit code 3)" in body_text(d), "the amber state")
    retry = wait_for(d, lambda d: next((b for b in d.find_elements("css selector", "button") if b.text.strip() == "Retry failed"), None),
                     "the Retry button")  # fmt: skip
    retry.click()
    wait_for(d, lambda d: "The last retry stopped before it fixed them" in body_text(d) and "Retry failed" in body_text(d),
             "why the retry stopped, and Retry offered again")  # fmt: skip
    idle(d)
    text = body_text(d)
    assert "Done with failures (exit code 3)" in text and str(gone) in text and "Failed (exit code" not in text
    assert "All 1 failed records of rate" in text and "Retry failed" in text

    d.get(f"{url}/samples?run=demo")
    wait_for(d, lambda d: "samples match" in body_text(d), "the Samples table")
    every = int(body_text(d).split(" samples match")[0].split(" of ")[-1].replace(",", ""))
    d.get(f"{url}/samples?run=demo&verdict=picked&sort=quality")  # a new session, as a pasted link
    wait_for(d, lambda d: "samples match" in body_text(d), "the linked Samples table")
    idle(d)
    caption = next(line for line in body_text(d).splitlines() if "samples match" in line)
    shown = int(caption.split(" of ")[0].replace(",", ""))
    assert 0 < shown < every, caption
    assert "verdict=picked" in d.current_url and "sort=quality" in d.current_url
    go(d, "Export")
    assert metric(d, "selected samples") == f"{shown:,}"  # the picked rows are the selection's
