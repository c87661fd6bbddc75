"""Every page of the Streamlit app through `AppTest`, on run directories built in the test.

The numbers the pages show are compared with what the library computes for the same settings.
UMAP is replaced by a fast stand-in here (the real one is tested in test_embed_map.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from synthetic_run import make_experiment, make_run
from waiting import wait_for

from app_pages import state as app_state

from threeds import cli
from threeds.config import (
    DataConfig,
    RunConfig,
    SelectConfig,
    SubsetConfig,
    run_command,
)
from threeds.names import METRICS
from threeds.rundir.read import load_run
from threeds.selection.apply import apply, load_preset
from threeds.selection.funnel import stage_counts
from threeds.selection.kcenter import band_filter
from threeds.selection.quality import quality_mask
from threeds.views import embed_map, heatmap
from threeds.views.export import dataset_info_entry, select_command

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["app_pages/quality.py", "app_pages/difficulty.py", "app_pages/inspector.py", "app_pages/embedding_map.py", "app_pages/export.py"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("THREEDS_CACHE", str(cache))
    monkeypatch.setattr(embed_map, "compute_umap", lambda emb, settings=None: np.asarray(emb[:, :2], np.float32))
    return cache


@pytest.fixture()
def demo(cache):
    return make_run(cache / "demo", n=40, n_dropped=10)


def app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)


def open_page(page: str, **state) -> AppTest:
    at = app().run()
    for key, value in state.items():
        if key in app_state.FIELDS or key.startswith("band_"):
            select(at, **{key: value})
        else:
            at.session_state[key] = value
    at.switch_page(page).run()
    assert not at.exception, at.exception[0].value if at.exception else None
    return at


def select(at: AppTest, **settings) -> None:
    """Change settings of the session's selection (SelectConfig fields or band_<metric>), as a widget would."""
    at.session_state[app_state.SELECTION] = app_state.changed(at.session_state[app_state.SELECTION], **settings)


def chosen(at: AppTest, name: str):
    """A setting of the session's selection."""
    return app_state.setting(name, at.session_state[app_state.SELECTION])


def widget(name: str) -> str:
    return app_state.widget_key(name)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_no_run_yet_every_page_says_so(cache):
    at = app().run()
    assert not at.exception
    assert "No run yet" in texts(at.info)
    for page in PAGES:
        at.switch_page(page).run()
        assert not at.exception
        assert "No run yet" in texts(at.info), page


def test_runs_page_shows_counts_and_manifest(demo):
    at = app().run()
    assert at.sidebar.selectbox(key="run_name").value == "demo"
    counts = stage_counts(load_run(demo))
    for label, value in counts.items():
        assert metric(at, label) == ("—" if value is None else f"{value:,}")
    assert at.json[0].value  # the manifest
    assert at.dataframe[0].value["run"].tolist() == ["demo"]


def test_runs_page_starts_a_run_in_the_background(demo, monkeypatch):
    started = []

    def fake_start(argv, run_dir, cwd=None):
        run_dir.mkdir()
        started.append((argv, run_dir))
        return 1

    monkeypatch.setattr("threeds.rundir.jobs.start_run", fake_start)
    at = app().run()
    at.radio(key="new_source").set_value("Path on this machine").run()
    at.text_input(key="new_path").set_value(str(demo / "input.jsonl")).run()
    at.text_input(key="new_name").set_value("demo").run()  # an existing name is refused
    assert at.button(key="new_start").disabled and "a run named 'demo' exists" in texts(at.warning).replace("\\", "")
    at.text_input(key="new_name").set_value("fresh").run()
    at.number_input(key="new_sample_num").set_value(17)
    at.button(key="new_start").click().run()
    assert not at.exception
    argv, run_dir = started[0]
    expected = run_command(str(demo / "input.jsonl"), run_dir,
                           RunConfig(data=DataConfig("rename"), subset=SubsetConfig(limit=20), select=SelectConfig(sample_num=17)))
    assert argv == expected and run_dir.name == "fresh"  # starts small: the first 20 records
    assert at.session_state["run_name"] == "fresh"
    at.radio(key="new_source").set_value("Sample data").run()  # the bundled MedQuAD sample repeats an id
    assert "2 records reuse an earlier id" in texts(at.caption) and "renamed" in texts(at.caption)


def test_the_start_form_checks_with_the_cli_rules_before_it_launches(demo, monkeypatch, tmp_path):
    """Issue 25 (3): a band of low 80 > high 20, a sample_num of 0 and a data file with a bad line
    each disable Start with the reason (the CLI's own words); fixed, the run starts."""
    started = []
    monkeypatch.setattr("threeds.rundir.jobs.start_run", lambda argv, run_dir, cwd=None: started.append(argv) or run_dir.mkdir())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    at = app().run()
    at.radio(key="new_source").set_value("Path on this machine").run()
    at.text_input(key="new_path").set_value(str(bad)).run()
    at.number_input(key="new_low").set_value(80.0)
    at.number_input(key="new_up").set_value(20.0)
    at.number_input(key="new_sample_num").set_value(0).run()
    shown = texts(at.warning).replace("\\", "")  # the messages are escaped markdown
    assert at.button(key="new_start").disabled and "Start is disabled" in shown
    assert "**sample_num**: must be at least 1" in shown and "bad.jsonl: invalid JSON on line 2" in shown, shown
    at.number_input(key="new_sample_num").set_value(5).run()  # a band is only checked once every field is valid
    shown = texts(at.warning).replace("\\", "")
    assert at.button(key="new_start").disabled and "**Band low %**: above --up-th 20; every band needs 0 <= low <= up <= 100" in shown, shown
    at.number_input(key="new_up").set_value(90.0)
    at.text_input(key="new_path").set_value(str(demo / "input.jsonl")).run()
    assert not at.warning and "input.jsonl: 50 records" in texts(at.caption)
    at.button(key="new_start").click().run()
    assert len(started) == 1 and "--low-th" in started[0] and "--sample-num" in started[0]


def test_an_upload_is_read_at_once_under_its_own_name(cache):
    """Issue 25 (3): an upload is checked as it arrives, by the reader the run uses, and named
    by its own file name and line (not the hashed copy the run reads)."""
    from app_pages import new_run

    class Upload:
        name = "my data.jsonl"

        def getbuffer(self):
            return b'{"instruction": "a", "output": "b"}\n{"instruction": "c", \n'

    path = new_run.save_upload(Upload())
    assert Path(path).name == "my data.jsonl" and Path(path).parent.parent == cache / "uploads"
    [message] = new_run.data_problems(path, Upload.name, "error").values()
    assert message.startswith("my data.jsonl: invalid JSON on line 2") and "uploads" not in message, message


def test_launcher_inputs_reach_the_command(demo, monkeypatch):
    from threeds.cli import build_parser
    from threeds.commands.run import config_from_args

    started = []
    monkeypatch.setattr("threeds.rundir.jobs.start_run", lambda argv, run_dir, cwd=None: started.append(argv) or run_dir.mkdir())
    at = app().run()
    at.radio(key="new_source").set_value("Path on this machine").run()
    at.text_input(key="new_path").set_value(str(demo / "input.jsonl")).run()
    at.text_input(key="new_name").set_value("small")
    at.selectbox(key="new_subset").set_value("N random records")
    at.number_input(key="new_n").set_value(7)
    at.number_input(key="new_sample_seed").set_value(3)
    at.selectbox(key="new_prompt").set_value("zh-medical")
    at.number_input(key="new_max_new_tokens").set_value(64)
    at.number_input(key="new_batch_size").set_value(4)
    at.selectbox(key="new_dtype").set_value("bfloat16")
    at.button(key="new_start").click().run()
    assert not at.exception
    config = config_from_args(build_parser().parse_args(started[0][3:]))
    assert config.subset == SubsetConfig(sample=7, sample_seed=3) and config.rate.prompt == "zh-medical"
    assert (config.generate.max_new_tokens, config.backend.batch_size, config.model.dtype) == (64, 4, "bfloat16")

    at.text_input(key="new_name").set_value("whole").run()  # "small" exists now: Start was disabled
    at.selectbox(key="new_subset").set_value("all records")
    at.selectbox(key="new_prompt").set_value("auto (from the data's language)")
    at.selectbox(key="new_dtype").set_value("auto")
    at.radio(key="new_backend").set_value("openai")
    at.button(key="new_start").click().run()
    config = config_from_args(build_parser().parse_args(started[1][3:]))
    assert config.subset == SubsetConfig() and (config.rate.prompt, config.model.dtype, config.backend.backend) == ("auto", "auto", "openai")
    assert "--batch-size" not in started[1]  # a local-backend setting


def test_quality_threshold_slider(demo):
    at = open_page("app_pages/quality.py")
    scores = load_run(demo).ratings["score"].to_numpy()
    for threshold in (85.0, 50.0, 95.0):
        at.slider(key=widget("quality_threshold")).set_value(threshold).run()
        kept = int(quality_mask(scores, threshold).sum())
        assert metric(at, "kept") == f"{kept:,}"
        assert metric(at, "dropped") == f"{len(scores) - kept:,}"
    table = at.table[0].value.reset_index()
    assert table["rated"].sum() == len(scores) and table["kept"].sum() == kept
    border = texts(at.markdown)
    above = sorted(s for s in scores if s >= 95.0)[0]
    below = sorted(s for s in scores if s < 95.0)[-1]
    assert f"**{above:g}**" in border and f"**{below:g}**" in border


def test_quality_page_without_stage1(cache):
    make_run(cache / "s2only", stages=("score",))
    at = open_page("app_pages/quality.py")
    assert "no Stage-1 ratings yet" in texts(at.info)


def test_difficulty_bands_follow_the_library(demo):
    at = open_page("app_pages/difficulty.py")
    metrics = load_run(demo).metrics
    settings = [
        ("mean", {"ins_ppl": (25.0, 75.0)}),
        ("mean", {"ins_ppl": (10.0, 90.0), "gt_wloss": (0.0, 60.0)}),
        ("max", {"gen_wloss": (30.0, 100.0)}),
    ]
    bands = {m: (25.0, 75.0) for m in METRICS}
    for atten, change in settings:
        at.radio(key=widget("atten_method")).set_value(atten)
        for m, band in change.items():
            at.slider(key=widget(f"band_{m}")).set_value(band)
            bands[m] = band
        at.run()
        assert not at.exception
        _, report = band_filter(metrics, bands, atten)
        assert metric(at, "in all three bands") == f"{report['n_kept']:,}"
        assert metric(at, "excluded (NaN metric)") == f"{report['n_excluded_nan']:,}"
        removed = [m.value for m in at.metric if m.label == "removed by this band"]
        assert removed == [f"{report['metrics'][m]['n_removed']:,}" for m in METRICS]
    at.toggle(key="ins_ppl_log").set_value(True).run()
    assert not at.exception


def test_difficulty_scatter_matrix_is_on_for_a_small_run_and_can_be_hidden(demo):
    at = open_page("app_pages/difficulty.py")
    assert at.toggle(key="show_splom").value is True  # 40 samples: under the default's limit
    assert len(at.get("plotly_chart")) == 4  # three histograms and the scatter matrix
    at.toggle(key="show_splom").set_value(False).run()
    assert len(at.get("plotly_chart")) == 3 and any("hidden" in c.value for c in at.caption)


def test_difficulty_without_stage2(cache):
    make_run(cache / "s1", stages=("rate",))
    at = open_page("app_pages/difficulty.py")
    assert "no Stage-2 metrics yet" in texts(at.info)


def test_corrupt_file_is_reported_on_the_page(demo):
    (demo / "metrics.parquet").write_bytes(b"not parquet")
    at = open_page("app_pages/difficulty.py")
    errors = re.sub(r"\\(.)", r"\1", texts(at.error))  # the markdown source, unescaped
    assert "cannot read Parquet" in errors and str(demo / "metrics.parquet") in errors
    at.switch_page("app_pages/quality.py").run()  # Stage 1 is intact: that page still works
    assert not at.error and metric(at, "kept")


def test_inspector_by_search_and_by_link(demo):
    run = load_run(demo)
    at = open_page("app_pages/inspector.py")
    assert "Type an id" in texts(at.info)
    at.text_input(key="inspect_query").set_value("asthma").run()
    wanted = [r["id"] for r in run.records if "asthma" in r["instruction"]]
    options = at.selectbox(key="inspect_match").options
    assert [o.split(" ")[0] for o in options] == wanted
    sample = wanted[1]
    at.selectbox(key="inspect_match").set_value(sample).run()
    assert f"`{sample}`" in texts(at.markdown)
    table = at.dataframe[0].value
    row = run.row_of[sample]
    ins = table[table["column"] == "ins_ppl"].iloc[0]
    assert ins["value"] == pytest.approx(run.metrics["ins_ppl"].iloc[row])
    values = run.metrics["ins_ppl"].to_numpy()
    assert ins["percentile rank"] == pytest.approx(100 * (values <= values[row]).mean())
    heatmaps = [h.value for h in at.html]
    assert len(heatmaps) == 2  # A and A' side by side, the contribution view first
    tokens = run.tokens(sample)
    gt = heatmap.token_view(tokens[tokens["response"] == "gt"], "w_mean", len(run.records[row]["output"]))
    first = gt.iloc[0]
    assert f"loss {first.loss:.3f}" in heatmaps[0] and f"contribution {first.contribution:.4g}" in heatmaps[0]
    assert f"weight share {100 * first.share:.2f}%" in heatmaps[0]
    assert "function word: yes" in heatmaps[0] and "color:#9e9e9e" in heatmaps[0]  # function words greyed
    assert "max-height:22rem;overflow-y:auto" in heatmaps[0]  # long answers scroll in a fixed box
    assert f"**gt_wloss_mean** = {heatmap.weighted_loss(gt):.4f}" in texts(at.markdown)
    colours = {}
    for view in heatmap.VIEWS:
        at.radio(key="inspect_view").set_value(view).run()
        assert not at.exception
        page = at.html[0].value
        scale = heatmap.view_scale(gt, heatmap.VIEWS[view][0])
        assert f"{scale.top:.3g}</span> clipped ({int(scale.clipped.sum())})" in page  # the legend's values
        assert page.count("outline:2px dashed") == 1 + int(scale.clipped.sum())  # legend swatch + clipped cells
        colours[view] = page.split("background:rgba(")[1].split(",")[:3]
    assert len({tuple(c) for c in colours.values()}) == 3  # a colour map per view
    assert chosen(at, "atten_method") == "mean"  # the view choice is the page's own

    other = run.records[5]["id"]
    link = app()
    link.query_params["id"] = other
    link.run()
    link.switch_page("app_pages/inspector.py").run()
    assert f"`{other}`" in texts(link.markdown)


def test_inspector_without_token_file(demo):
    (demo / "tokens.parquet").unlink()
    at = open_page("app_pages/inspector.py", inspect_id="s000003")
    assert "missing" in texts(at.error)
    assert "treatment" in texts(at.text)  # the texts are still shown


def test_embedding_map_sample_num_and_click(demo):
    at = open_page("app_pages/embedding_map.py")
    run = load_run(demo)
    mask, report = band_filter(run.metrics, None, "mean")
    slider = at.slider(key=widget("sample_num"))
    assert slider.max == report["n_kept"] and slider.value == report["n_kept"]  # 5000 shown at the end
    assert chosen(at, "sample_num") == 5000 and f"sample_num 5,000: all {report['n_kept']} candidates are picked" in texts(at.caption)
    slider.set_value(3).run()
    assert "3 k-center picks" in texts(at.caption) and chosen(at, "sample_num") == 3
    for colour in at.selectbox(key="map_colour").options:
        at.selectbox(key="map_colour").set_value(colour).run()
        assert not at.exception, colour
    at.session_state["inspect_id"] = "s000007"
    at.session_state["goto_inspector"] = True  # what a click on a point sets (on_select callback)
    at.run()
    assert at.title[0].value == "Sample inspector"
    assert "`s000007`" in texts(at.markdown)


def test_a_visit_to_the_map_or_a_brush_never_changes_sample_num(demo):
    """Issue 25 (5): opening the map with sample_num above its candidates (a link here) kept the
    slider's end as the setting (10 -> 6); a brush, then any sequence of pages, keeps the setting
    in the URL, the sidebar and Export (a page without the slider drops the slider's own state)."""
    at = app()
    at.query_params.update({"run": "demo", "sample_num": "9999"})
    at.run()
    at.switch_page("app_pages/embedding_map.py").run()
    candidates = int(at.slider(key=widget("sample_num")).max)
    assert at.query_params["sample_num"] == "9999" and chosen(at, "sample_num") == 9999 < 10_000
    at.slider(key=widget("sample_num")).set_value(candidates - 2).run()
    at.session_state["brush_rows"] = np.array([1, 2, 3])  # what a lasso's callback sets
    at.run()
    for page in ("samples", "difficulty", "embedding_map", "quality", "samples", "export"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert at.query_params["sample_num"] == str(candidates - 2), page
        assert f"picked **{candidates - 2}**" in sidebar_funnel(at), page
    assert f"--sample-num {candidates - 2} " in at.code[1].value and metric(at, "selected samples") == str(candidates - 2)


def test_export_names_the_run_by_its_absolute_path(cache, monkeypatch):
    """Issue 25 (6): with the cache given relative to the app's directory (the default `cache/`), the
    command Export shows still works when pasted in another directory."""
    make_run(cache / "demo", n=40, n_dropped=10)
    monkeypatch.chdir(cache.parent)
    monkeypatch.setenv("THREEDS_CACHE", "cache")
    at = open_page("app_pages/export.py", sample_num=3)
    assert f"threeds select --run {cache / 'demo'} --out " in at.code[1].value


def test_the_inspector_says_what_the_why_means(demo):
    """Issue 25 (6): beside the rule, what it means for the sample."""
    run = load_run(demo)
    at = open_page("app_pages/export.py")
    chosen = apply(SelectConfig(quality_threshold=85.0), run.metrics, run.embeddings, run.ratings)
    low = next(i for i, w in zip(chosen.ids, chosen.reason) if w.startswith("Response Confidence below"))
    at.session_state["inspect_id"] = low
    at.switch_page("app_pages/inspector.py").run()
    why = texts(at.markdown).replace("\\", "")
    assert "- Response Confidence below the 25th percentile — *the model already answers this confidently: little to learn from it*" in why, why
    at.switch_page("app_pages/samples.py").run()
    table = at.dataframe[0].value.set_index("id")
    assert table.loc[low, "in plain words"].startswith("the model already answers this confidently")


def test_export_page_matches_the_library(demo, tmp_path):
    at = open_page("app_pages/export.py", sample_num=4)
    run = load_run(demo)
    assert metric(at, "selected samples") == "4"
    codes = [c.value for c in at.code]
    assert json.loads(codes[0]) == dataset_info_entry("threeds_demo", "alpaca")
    # the run's own settings: its quality threshold 85 and the default bands
    config = SelectConfig(sample_num=4, quality_threshold=85.0)
    assert codes[1] == select_command(str(demo), "threeds_demo_selected.json", config)
    preview = at.table[0].value.reset_index()
    assert preview["id"].tolist() == apply(config, run.metrics, run.embeddings, run.ratings).picked_ids
    at.radio(key="export_format").set_value("sharegpt").run()
    assert json.loads(at.code[0].value)["threeds_demo"]["formatting"] == "sharegpt"
    assert "threeds_demo_sharegpt.json" in at.get("download_button")[0].proto.label
    assert len(run.metrics) == 40


def test_every_page_on_a_real_threeds_run(cache, tiny_model_dir):
    """A run made by `threeds run` (tiny model, fake OpenAI-compatible server for Stage 1 and A'):
    every page opens without error and starts from the run's own settings, so Export shows the
    run's own selection."""
    from fake_openai_server import FakeOpenAIServer
    from test_run_command import _fake_model

    from threeds.cli import main as cli

    data = cache.parent / "data.jsonl"
    rows = [{"id": f"q{i}", "instruction": f"About question {i}: why do I cough at night?",
             "output": "Coughing at night is often caused by postnasal drip or asthma. " * (1 + i % 3),
             "source": "ab"[i % 2]} for i in range(14)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeOpenAIServer(default_reply=_fake_model) as server:
        assert cli(["run", "--data", str(data), "--out", str(cache / "real"), "--backend", "openai",
                    "--base-url", server.base_url, "--model", str(tiny_model_dir), "--quality-threshold", "70",
                    "--sample-num", "3", "--low-th", "10", "--up-th", "90", "--max-new-tokens", "12"]) == 0  # fmt: skip
    at = app().run()
    assert metric(at, "kept by quality") == "10" and metric(at, "selected") == "3"  # 50 + 5 i >= 70
    for page in PAGES:
        at.switch_page(page).run()
        assert not at.exception and not at.error, (page, at.exception or at.error)
    assert at.slider(key=widget("sample_num")).value == 3
    assert "this selection is identical" in texts(at.caption)
    at.switch_page("app_pages/quality.py").run()
    assert at.slider(key=widget("quality_threshold")).value == 70.0
    scored = load_run(cache / "real").metrics.iloc[1]
    at.session_state["inspect_id"] = scored["id"]
    at.switch_page("app_pages/inspector.py").run()
    shown = texts(at.markdown)  # the contributions drawn add up to the run's own metrics
    assert f"**gt_wloss_mean** = {scored['gt_wloss_mean']:.4f}" in shown and f"**gen_wloss_mean** = {scored['gen_wloss_mean']:.4f}" in shown


def test_runs_page_follows_a_background_run(demo):
    """A job started the way the Runs page starts one: progress while it runs, Resume once stopped."""
    import sys

    from threeds.rundir.jobs import job_running, start_run

    script = (
        "from threeds.cli import honour_interrupts; honour_interrupts()\n"  # as `threeds` does: this suite may run with SIGINT ignored
        "import json, sys, time, pathlib\n"
        "p = pathlib.Path(sys.argv[1]) / 'progress.json'\n"
        "p.write_text(json.dumps({'stage': 'rate', 'done': 3, 'total': 10, 'updated': time.time()}))\n"
        "time.sleep(600)\n"
    )
    start_run([sys.executable, "-c", script, str(demo)], demo)
    wait_for((demo / "progress.json").exists, "progress.json written")
    at = app().run()
    assert "rate: 3 / 10" in at.get("progress")[0].proto.text
    assert "Running in the background" in texts(at.caption)
    at.button(key="stop_run").click().run()
    assert not job_running(demo)  # Stop returns once the run's processes are gone
    at.run()
    assert "Stopped before the end" in texts(at.caption)
    assert "Stop: stopped (SIGINT): finished work is saved" in texts(at.info)
    assert at.button(key="resume_run")


def test_user_controlled_text_is_escaped_and_run_file_errors_are_one_line(cache):
    """A run name and a sample id full of markdown reach the page as literal text; a repeated id in
    metrics.parquet shows the one line the command line prints."""
    import pandas as pd

    from app_pages.common import code, md

    hostile = "*x* _y_ `z` [l](http://e) $a$ :red[r] <b>#"
    assert md(hostile) == r"\*x\* \_y\_ \`z\` \[l\](http\://e) \$a\$ \:red\[r\] \<b\>#"
    assert md("# a\nb") == r"\# a b" and md("1. x") == r"\1. x" and md("- x") == r"\- x"
    assert code("a`b") == "``a`b``" and code("`x") == "`` `x ``" and code("*y*") == "`*y*`"
    run = make_run(cache / "r*1*", n=30, n_dropped=0)
    at = app().run()
    assert not at.exception
    assert at.header[0].value == "Run `r*1*`"
    metrics = pd.read_parquet(run / "metrics.parquet")
    metrics.loc[5, "id"] = metrics.loc[1, "id"]
    metrics.to_parquet(run / "metrics.parquet", index=False)
    at = app().run()
    errors = re.sub(r"\\(.)", r"\1", texts(at.error))  # the markdown source, unescaped
    assert f"{run / 'metrics.parquet'}: row 5: duplicate id 's000001' (first at row 1)" in errors and "\n" not in errors


def test_runs_page_shows_a_failed_run_as_failed(demo, tmp_path):
    """A real `threeds run` started the way the Runs page starts one, on data with a broken line."""
    import sys

    from threeds.rundir.jobs import job_running, start_run

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "instruction": "q", "output": "a"}\nnot json\n')
    run_dir = demo.parent / "broken"
    start_run(run_command(bad, run_dir, RunConfig()), run_dir, cwd=ROOT)
    wait_for(lambda: not job_running(run_dir), "the run ended", poll=0.2)
    at = app()
    at.session_state["run_name"] = "broken"
    at.run()
    assert not at.exception
    shown = re.sub(r"\\(.)", r"\1", texts(at.error))  # the markdown source, unescaped
    assert "Failed (exit code 1)" in shown and "line 2" in shown and str(bad) in shown
    assert at.button(key="resume_run").label == "Run again"
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["broken", "state"] == "failed" and table.loc["demo", "state"] == ""  # no status.json
    log = [c.value for c in at.code][1]
    assert "ERROR" in log and "\r" not in log and "\x1b" not in log
    assert sys.executable in at.code[0].value  # the full command


def test_runs_page_shows_done_and_the_time_left(demo):
    """status.json 'done' is shown as done; a running stage shows its pace as a time left."""
    import time

    from threeds.rundir.progress import write_status

    write_status(demo, "done", exit_code=0)
    at = app().run()
    assert "Done" in texts(at.success)
    now = time.time()
    (demo / "progress.json").write_text(json.dumps({"stage": "generate", "done": 13, "total": 40, "unit": "records",
                                                    "started": now - 30, "done_at_start": 10, "updated": now}))  # fmt: skip
    (demo / "status.json").unlink()  # a run started in a terminal by an older threeds: no status
    at.run()
    assert "generate: 13 / 40 records · about 4 min 30 s left" in at.get("progress")[0].proto.text
    write_status(demo, "running")
    at.run()  # no process behind a status 'running': it was killed
    assert "killed" in texts(at.warning) and not at.get("progress")
    assert "Reached generate: 13 / 40 records" in texts(at.caption)


def exported_ids(line: str, out: Path) -> list[str]:
    """Run the `threeds select` command Export shows (writing to `out`); the ids it selects."""
    argv = shlex.split(line)
    argv[argv.index("--out") + 1] = str(out)
    assert cli.main(argv[1:]) == 0
    return [r["id"] for r in json.loads(out.read_text())]


def sidebar_funnel(at: AppTest) -> str:
    return texts(at.sidebar.markdown)


def test_one_selection_on_every_page_and_the_exported_command(demo, tmp_path):
    """Issue 11 (1): the quality threshold set on Quality reaches Difficulty, the map and Export;
    the funnel shows it everywhere; the exported command picks the same ids in the same order."""
    run = load_run(demo)
    at = open_page("app_pages/quality.py")
    at.slider(key=widget("quality_threshold")).set_value(95.0).run()
    config = SelectConfig(quality_threshold=95.0, sample_num=5000)
    expected = apply(config, run.metrics, run.embeddings, run.ratings)
    scores = run.ratings["score"].to_numpy(dtype=float)
    kept = int((scores >= 95).sum())
    scored_kept = int(np.isin(run.metrics["id"], run.ratings["id"][scores >= 95]).sum())
    assert expected.funnel["kept by quality"] == kept and expected.funnel["scored"] == scored_kept
    line = f"rated **{int(np.isfinite(scores).sum())}** → kept by quality **{kept}** → scored **{scored_kept}**"
    assert line in sidebar_funnel(at)
    at.switch_page("app_pages/difficulty.py").run()
    assert metric(at, "scored samples kept by quality") == str(scored_kept)
    assert metric(at, "in all three bands") == str(expected.funnel["in all bands"])
    assert line in sidebar_funnel(at)
    at.switch_page("app_pages/export.py").run()
    n = expected.funnel["picked"]
    assert metric(at, "selected samples") == str(n)
    shown = at.code[1].value
    assert "--quality-threshold 95" in shown
    cli_ids = exported_ids(shown, tmp_path / "cli.json")
    assert cli_ids == expected.picked_ids and len(cli_ids) == n > 0
    assert at.table[0].value.reset_index()["id"].tolist() == cli_ids[:20]


def test_inspector_attention_view_never_changes_the_selection(demo):
    at = open_page("app_pages/export.py", sample_num=4)
    before = at.code[1].value
    at.switch_page("app_pages/inspector.py").run()
    at.query_params["id"] = "s000003"
    at.session_state["inspect_id"] = "s000003"
    at.run()
    verdict = [m for m in texts(at.markdown).splitlines() if "selection:" in m]
    at.radio(key="inspect_atten").set_value("max").run()
    assert chosen(at, "atten_method") == "mean"
    assert [m for m in texts(at.markdown).splitlines() if "selection:" in m] == verdict
    assert "gt_wloss_max" in texts(at.markdown)  # the heatmaps follow the page-local view
    at.switch_page("app_pages/export.py").run()
    assert at.code[1].value == before


def test_a_pasted_link_opens_its_run_settings_and_sample(demo, cache):
    """Issue 11 (2): ?run=...&settings&id=... on the inspector reproduces the view in a new session."""
    make_run(cache / "other", n=40, n_dropped=10, seed=2)
    at = app()
    at.query_params.update({"run": "other", "quality_threshold": "95", "conf_up": "80", "sample_num": "3", "id": "s000004"})
    at.run()
    at.switch_page("app_pages/inspector.py").run()
    assert not at.exception
    assert at.session_state["run_name"] == "other" and chosen(at, "quality_threshold") == 95.0
    assert chosen(at, "band_gen_wloss") == (25.0, 80.0) and chosen(at, "sample_num") == 3
    assert "`s000004`" in texts(at.markdown)
    assert at.query_params["id"] == "s000004" and at.query_params["run"] == "other"
    at.switch_page("app_pages/export.py").run()
    line = at.code[1].value
    assert "--conf-up 80 --corr-low 25 --corr-up 75 --sample-num 3" in line and "--quality-threshold 95" in line
    assert "id" not in at.query_params  # the sample id belongs to the inspector's URL


def test_the_url_follows_every_setting(demo):
    at = open_page("app_pages/quality.py")
    assert at.query_params["run"] == "demo" and at.query_params["quality_threshold"] == "85"
    at.slider(key=widget("quality_threshold")).set_value(91.0).run()
    at.switch_page("app_pages/difficulty.py").run()
    at.slider(key=widget("band_gt_wloss")).set_value((10.0, 60.0)).run()
    at.radio(key=widget("atten_method")).set_value("max").run()
    params = dict(at.query_params)
    assert params == {"run": "demo", "quality_threshold": "91", "atten_method": "max", "ins_low": "25", "ins_up": "75",
                      "conf_low": "25", "conf_up": "75", "corr_low": "10", "corr_up": "60"}  # fmt: skip
    again = app()  # a reload: a new session with the same URL
    again.query_params.update(params)
    again.run()
    again.switch_page("app_pages/difficulty.py").run()
    assert chosen(again, "band_gt_wloss") == (10.0, 60.0) and chosen(again, "atten_method") == "max"
    assert metric(again, "in all three bands") == metric(at, "in all three bands")


def test_a_bad_link_setting_is_named_and_ignored(demo):
    at = app()
    at.query_params.update({"run": "nope", "low_th": "abc"})
    at.run()
    warnings = texts(at.sidebar.warning)
    assert "run 'nope'" in warnings and "low_th='abc' is not a valid float" in warnings
    assert at.session_state["run_name"] == "demo"


def test_presets_save_list_load_and_cli(demo, tmp_path):
    at = open_page("app_pages/export.py", sample_num=3)
    at.sidebar.text_input(key="preset_name").set_value("three").run()
    at.sidebar.button(key="preset_save").click().run()
    assert (demo / "selections" / "three.json").is_file()
    shown = at.code[1].value
    select(at, sample_num=5)
    at.run()
    assert at.code[1].value != shown
    at.sidebar.selectbox(key="preset_pick").set_value("three")
    at.sidebar.button(key="preset_load").click().run()
    assert at.code[1].value == shown and "threeds select --preset three" in texts(at.sidebar.caption)
    out = tmp_path / "p.json"
    assert cli.main(["select", "--run", str(demo), "--out", str(out), "--preset", "three"]) == 0
    assert [r["id"] for r in json.loads(out.read_text())] == at.table[0].value.reset_index()["id"].tolist()


def test_samples_table_filters_search_sort_and_opens_the_inspector(demo):
    """Issue 11 (3): every scored sample with verdict, why and pick rank, as the library says."""
    run = load_run(demo)
    at = open_page("app_pages/samples.py", sample_num=3)
    chosen = apply(SelectConfig(sample_num=3, quality_threshold=85.0), run.metrics, run.embeddings, run.ratings)
    table = at.dataframe[0].value
    assert len(table) == len(run.metrics)
    assert table["id"].tolist()[:3] == chosen.picked_ids  # sorted by pick rank: picks first, in order
    row = run.row_of[table["id"].iloc[10]]
    assert table["why"].iloc[10] == chosen.reason[row] and table["verdict"].iloc[10] == chosen.verdict[row]
    at.multiselect(key="samples_verdict").set_value(["dropped"]).run()
    assert set(at.dataframe[0].value["verdict"]) == {"dropped"}
    assert len(at.dataframe[0].value) == int((chosen.verdict == "dropped").sum())
    at.multiselect(key="samples_reason").set_value(["Response Confidence above"]).run()
    shown = at.dataframe[0].value
    assert len(shown) == sum("Response Confidence above" in w for w in chosen.reason) and len(shown) > 0
    at.multiselect(key="samples_verdict").set_value(list(("picked", "not picked", "dropped"))).run()
    at.multiselect(key="samples_reason").set_value([]).run()
    at.text_input(key="samples_query").set_value("ASTHMA").run()  # instruction, A or A', any case
    assert sorted(at.dataframe[0].value["id"]) == sorted(r["id"] for r in run.records if "asthma" in r["instruction"])
    at.text_input(key="samples_query").set_value("").run()
    at.selectbox(key="samples_sort").set_value("quality").run()
    q = at.dataframe[0].value["quality"].to_numpy()
    assert (np.diff(q) <= 0).all()
    sample = at.dataframe[0].value["id"].iloc[0]
    at.session_state["samples_table"] = {"selection": {"rows": [0], "columns": []}}
    at.run()
    assert at.title[0].value == "Sample inspector" and f"`{sample}`" in texts(at.markdown)


def test_a_brush_filters_the_table_and_becomes_a_rule(demo, tmp_path):
    """Issue 11 (4): a lasso on the map (the brush its callback sets) filters Samples; "always include"
    makes the ids k-center centres first; the exported command reproduces it."""
    run = load_run(demo)
    at = open_page("app_pages/embedding_map.py", sample_num=4)
    ids = [str(i) for i in run.metrics["id"].iloc[[3, 17, 30]]]
    at.session_state["brush_rows"] = np.array([run.row_of[i] for i in ids])
    at.session_state["brush_label"] = "3 points from a box/lasso on the map"
    at.run()
    assert "unbrushed points greyed" in texts(at.caption)
    at.switch_page("app_pages/samples.py").run()
    assert sorted(at.dataframe[0].value["id"]) == sorted(ids)
    at.button(key="rule_add_include").click().run()
    assert chosen(at, "include") == tuple(ids[i] for i in np.argsort([run.row_of[i] for i in ids]))
    at.button(key="brush_clear").click().run()
    table = at.dataframe[0].value
    assert len(table) == len(run.metrics)
    assert table["id"].tolist()[:3] == list(chosen(at, "include"))  # picks 1-3: the included ids
    assert set(table["why"].iloc[:3]) <= {"always include (rule)"} | {w for w in table["why"] if w.startswith("always include (rule) over")}
    at.switch_page("app_pages/export.py").run()
    line = at.code[1].value
    assert "--include " + ",".join(chosen(at, "include")) in line
    assert exported_ids(line, tmp_path / "r.json") == at.table[0].value.reset_index()["id"].tolist()[:4]


def test_compare_two_presets_and_two_runs(demo, cache):
    """Issue 11 (5): counts per stage, overlap and the difference, as the library computes them."""
    from threeds.selection.apply import overlap, save_preset

    run = load_run(demo)
    wide, narrow = SelectConfig(sample_num=6, quality_threshold=85.0), SelectConfig(sample_num=6, quality_threshold=85.0, low_th=10.0, conf_up=60.0)
    save_preset(demo, "a-wide", wide)
    save_preset(demo, "b-narrow", narrow)
    at = open_page("app_pages/compare.py")
    assert at.selectbox(key="compare_sel_A").value == "(current selection)" and at.selectbox(key="compare_sel_B").value == "a-wide"
    at.selectbox(key="compare_sel_A").set_value("a-wide").run()
    at.selectbox(key="compare_sel_B").set_value("b-narrow").run()
    a, b = (apply(c, run.metrics, run.embeddings, run.ratings) for c in (wide, narrow))
    parts = overlap(a.picked_ids, b.picked_ids)
    assert metric(at, "picked by both") == str(len(parts["both"])) and metric(at, "only A") == str(len(parts["only A"]))
    counts = at.dataframe[0].value
    said = [s for s in a.funnel if a.funnel[s] is not None or b.funnel[s] is not None]  # "A' not flagged": no rule
    assert counts["stage"].tolist() == said and "A' not flagged" not in said
    assert counts["A"].tolist() == [a.funnel[s] for s in said] and counts["B"].tolist() == [b.funnel[s] for s in said]
    diff = at.dataframe[1].value
    assert diff["id"].tolist() == parts["only A"] + parts["only B"]
    assert f"({len(diff)} ids" in at.get("download_button")[0].proto.label
    make_run(cache / "rescored", n=40, n_dropped=10, seed=5)  # the same record ids, other metrics
    at.run()
    at.selectbox(key="compare_run_B").set_value("rescored").run()
    at.selectbox(key="compare_sel_B").set_value("(current selection)").run()
    assert not at.exception and metric(at, "picked by both")


ALL_PAGES = ["app_pages/quality.py", "app_pages/difficulty.py", "app_pages/samples.py", "app_pages/inspector.py",
             "app_pages/embedding_map.py", "app_pages/compare.py", "app_pages/export.py"]  # fmt: skip


@pytest.fixture()
def flagged(demo):
    from synthetic_run import flag_answers

    return flag_answers(demo)


def test_flags_on_the_difficulty_page_and_their_rule(demo, flagged, tmp_path):
    """Issue 11 (6): counts per flag; the rule is part of the selection (funnel, URL, export, CLI)."""
    at = open_page("app_pages/difficulty.py")
    assert [metric(at, f"A' {name}") for name in ("hit max-new-tokens", "repeats itself", "empty")] == ["2", "2", "1"]
    assert "max-new-tokens 400" in texts(at.caption)
    at.multiselect(key=widget("exclude_flags")).set_value(["hit_max", "repeats", "empty"]).run()
    run = load_run(demo)
    from threeds.selection.answer_flags import run_answer_flags

    config = SelectConfig(quality_threshold=85.0, exclude_flags=("hit_max", "repeats", "empty"))
    expected = apply(config, run.metrics, run.embeddings, run.ratings, run_answer_flags(demo, run.metrics, run.records, run.manifest))
    unflagged = expected.funnel["A' not flagged"]
    assert f"A' not flagged **{unflagged}**" in sidebar_funnel(at) and unflagged == expected.funnel["scored"] - 5
    assert metric(at, "scored samples kept by quality, A' not flagged") == str(expected.report["n_total"])
    assert at.query_params["exclude_flags"] == "hit_max,repeats,empty"
    at.switch_page("app_pages/export.py").run()
    line = at.code[1].value
    assert "--exclude-flagged hit_max,repeats,empty" in line
    ids = exported_ids(line, tmp_path / "f.json")
    assert ids == expected.picked_ids and not set(ids) & {i for group in flagged.values() for i in group}


def test_flags_in_the_samples_table_and_the_inspector(demo, flagged):
    at = open_page("app_pages/samples.py", exclude_flags=("repeats",))
    table = at.dataframe[0].value
    by_id = table.set_index("id")["A' flags"]
    assert by_id[flagged["hit_max"][0]] == "hit max-new-tokens" and by_id[flagged["empty"][0]] == "empty"
    assert (by_id != "").sum() == 5
    assert all(table.set_index("id").loc[i, "why"].startswith("A' repeats itself") for i in flagged["repeats"])
    at.multiselect(key="samples_flags").set_value(["repeats itself", "empty"]).run()
    assert sorted(at.dataframe[0].value["id"]) == sorted(flagged["repeats"] + flagged["empty"])
    at.multiselect(key="samples_flags").set_value([]).run()
    at.multiselect(key="samples_reason").set_value(["A' repeats itself"]).run()
    assert sorted(at.dataframe[0].value["id"]) == sorted(flagged["repeats"])
    at.switch_page("app_pages/inspector.py").run()
    at.session_state["inspect_id"] = flagged["hit_max"][0]
    at.run()
    assert ":orange-badge[:material/flag: A' hit max-new-tokens]" in texts(at.markdown)
    assert "401 tokens" not in texts(at.caption) and "400 tokens of max-new-tokens 400" in texts(at.caption)
    at.session_state["inspect_id"] = "s000000"
    at.run()
    assert "badge" not in texts(at.markdown) and "A' not flagged" in texts(at.caption)


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ({"quality_threshold": 100.0}, "the quality threshold 100 keeps none of the scored samples"),
        ({f"band_{m}": (40.0, 40.0) for m in METRICS}, "no sample lies inside all three percentile bands"),
    ],
)
def test_an_empty_selection_is_named_on_every_page(demo, state, reason):
    ratings = [json.loads(line) for line in (demo / "ratings.jsonl").read_text().splitlines()]
    for row in ratings:  # none rated 100 (rounding can make one)
        row["score"] = min(row["score"], 99.0) if row["score"] is not None else None
    (demo / "ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ratings))
    at = app().run()
    select(at, **state)
    at.run()
    assert reason in texts(at.warning)  # the Runs page too
    for page in ALL_PAGES:
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        assert f"**This selection picks 0 samples:** {reason}" in texts(at.warning), page


def test_switching_runs_keeps_the_tuned_selection(demo, cache):
    """Issue 11 (2): bands and threshold are percentiles and a score, valid for any run: switching
    runs keeps them (rules only when the new run has their ids); the new run's numbers follow."""
    make_run(cache / "other", n=40, n_dropped=10, seed=2)
    at = open_page("app_pages/difficulty.py")
    at.slider(key=widget("band_gt_wloss")).set_value((10.0, 60.0)).run()
    select(at, quality_threshold=90.0, exclude=("s000001",))
    at.run()
    at.sidebar.selectbox(key="run_name").set_value("other").run()
    assert chosen(at, "band_gt_wloss") == (10.0, 60.0) and chosen(at, "quality_threshold") == 90.0
    assert chosen(at, "exclude") == ("s000001",)  # "other" scored the same ids
    assert at.query_params["run"] == "other" and at.query_params["corr_low"] == "10" and at.query_params["quality_threshold"] == "90"
    run = load_run(cache / "other")
    config = SelectConfig(quality_threshold=90.0, corr_low=10.0, corr_up=60.0, exclude=("s000001",))
    assert metric(at, "in all three bands") == str(apply(config, run.metrics, run.embeddings, run.ratings).funnel["in all bands"])
    make_run(cache / "small", n=5, n_dropped=0, seed=3)  # lacks s000010
    select(at, exclude=("s000010",))
    at.run()
    at.sidebar.selectbox(key="run_name").set_value("small").run()
    assert chosen(at, "exclude") == () and "exclude rule names samples" in texts(at.sidebar.caption)
    assert chosen(at, "band_gt_wloss") == (10.0, 60.0)


def test_back_and_forward_on_one_page_restore_its_settings(demo, monkeypatch):
    """Issue 11 (2): Streamlit pushes a history entry per query string and reruns with the popped
    one marked as history navigation; the app then takes the settings from the URL."""
    at = open_page("app_pages/difficulty.py")
    before = dict(at.query_params)
    at.slider(key=widget("band_ins_ppl")).set_value((5.0, 95.0)).run()
    after = dict(at.query_params)
    assert after["ins_low"] == "5" and after != before
    at.query_params.clear()
    at.query_params.update(before)  # the browser's back: the previous entry's query string
    at.run()
    assert chosen(at, "band_ins_ppl") == (5.0, 95.0)  # a plain rerun with an old URL (a drag) is not read
    assert dict(at.query_params) == after  # and the URL is rewritten from the session
    monkeypatch.setattr(app_state, "history_navigation", lambda: True)
    at.query_params.clear()
    at.query_params.update(before)
    at.run()
    assert chosen(at, "band_ins_ppl") == (25.0, 75.0) and dict(at.query_params) == before
    at.query_params.clear()
    at.query_params.update(after)  # forward
    at.run()
    assert chosen(at, "band_ins_ppl") == (5.0, 95.0) and at.slider(key=widget("band_ins_ppl")).value == (5.0, 95.0)


def test_back_forward_is_read_from_streamlits_flag_which_every_allowed_version_has(monkeypatch):
    """The one Streamlit internal the app reads (no public API says a run is back/forward): the
    script-run context's `is_history_navigation`, first in Streamlit 1.65, the minimum
    requirements.txt allows; read directly, so a Streamlit without it fails loudly, not by
    silently ignoring back/forward as a `getattr` default did on 1.40-1.64."""
    import dataclasses
    import re
    from types import SimpleNamespace

    import streamlit
    from streamlit.runtime.scriptrunner_utils.script_run_context import ScriptRunContext

    minimum = re.search(r"^streamlit>=([\d.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert tuple(map(int, minimum.split("."))) >= (1, 65)
    assert tuple(map(int, streamlit.__version__.split(".")[:2])) >= (1, 65)
    assert "is_history_navigation" in {f.name for f in dataclasses.fields(ScriptRunContext)}
    monkeypatch.setattr(app_state, "get_script_run_ctx", lambda: SimpleNamespace(is_history_navigation=True))
    assert app_state.history_navigation() is True
    monkeypatch.setattr(app_state, "get_script_run_ctx", lambda: SimpleNamespace(is_history_navigation=False))
    assert app_state.history_navigation() is False
    monkeypatch.setattr(app_state, "get_script_run_ctx", lambda: SimpleNamespace())
    with pytest.raises(AttributeError):
        app_state.history_navigation()


def test_a_large_map_is_an_image_with_the_first_picks_hoverable(cache):
    """Issue 11 (7): above SVG_POINTS the map is one image (its cost does not grow with the points)
    with HOVER_POINTS markers, the first picks among them."""
    make_run(cache / "demo", n=1_800, n_dropped=10, dim=8)
    at = open_page("app_pages/embedding_map.py", sample_num=100)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert len(spec["layout"]["images"]) == 1 and spec["layout"]["images"][0]["source"].startswith("data:image/png")
    hover = spec["data"][0]
    run = load_run(cache / "demo")
    config = SelectConfig(sample_num=100, quality_threshold=85.0)
    first_picks = apply(config, run.metrics, run.embeddings, run.ratings).picked_ids[:80]
    assert set(first_picks) <= set(hover["customdata"]) and len(hover["customdata"]) <= 120
    assert any(t.startswith("pick # 1<br>") for t in hover["text"])
    assert "drawn as an image" in texts(at.caption)
    for colour in at.selectbox(key="map_colour").options:
        at.selectbox(key="map_colour").set_value(colour).run()
        assert not at.exception, colour


@pytest.mark.parametrize(("code", "said"), [(130, "interrupted, SIGINT"), (137, "ended by SIGKILL after SIGINT and SIGTERM")])
def test_a_stopped_run_says_how_it_ended(demo, code, said):
    """A run the Stop button had to kill records `stopped` with 128 + signal (threeds.rundir.jobs); the
    Runs page names the signal rather than calling it killed."""
    from threeds.rundir.progress import write_status

    write_status(demo, "stopped", exit_code=code, error="stopped", pid=2**22 + 7)  # no such process
    at = app().run()
    assert f"Stopped by the user ({said}" in texts(at.warning)


def test_the_runs_page_says_what_3ds_does_and_where_to_go(demo):
    """Issue 25 (6): a first visit lands on Runs: two lines on what 3DS does, links along Quality ->
    Difficulty -> Samples -> Export, and where a new run starts."""
    at = app().run()
    assert "picks the samples worth fine-tuning" in texts(at.markdown)
    links = [(e.proto.page, e.proto.label) for e in at.get("page_link")]
    assert [label for _, label in links] == ["Quality", "Difficulty", "Samples", "Export"], links
    assert "(#start-a-new-run)" in texts(at.markdown) and "Start a new run" in [h.value for h in at.header]


def test_the_search_and_the_brush_are_kept_in_the_url(demo):
    """Issue 25 (6): the Samples search and a brush are part of the link: a new session opened with
    the URL shows the same rows, and back to no brush clears it."""
    run = load_run(demo)
    at = open_page("app_pages/embedding_map.py")
    rows = np.array([3, 17, 30])
    at.session_state["brush_rows"] = rows  # what a lasso's callback sets
    at.session_state["brush_label"] = "3 points from a box/lasso on the map"
    at.run()
    assert app_state.decode_rows(at.query_params["brush"]).tolist() == [3, 17, 30]
    at.switch_page("app_pages/samples.py").run()
    at.text_input(key="samples_query").set_value("a").run()
    params = dict(at.query_params)
    assert params["search"] == "a" and params["brush_label"] == "3 points from a box/lasso on the map"
    shown = sorted(at.dataframe[0].value["id"])
    assert 0 < len(shown) <= 3 and set(shown) <= set(run.metrics["id"].iloc[rows])
    again = app()  # a reload, or the link pasted elsewhere
    again.query_params.update(params)
    again.run()
    again.switch_page("app_pages/samples.py").run()
    assert sorted(again.dataframe[0].value["id"]) == shown and again.text_input(key="samples_query").value == "a"
    assert "3 points from a box/lasso on the map" in texts(again.info)
    again.switch_page("app_pages/difficulty.py").run()
    assert "search" not in again.query_params and again.query_params["brush"] == params["brush"]  # the search is Samples'
    bad = app()
    bad.query_params.update({"run": "demo", "brush": "!!"})
    bad.run()
    assert "brush='!!' is not a brush this app wrote" in texts(bad.sidebar.warning) and "brush" not in bad.query_params


def test_a_pasted_outcomes_link_opens_its_experiment_and_item_and_a_stopped_unit_reads_stopped(demo):
    """Issue 31 (3): the experiment and the opened item are in the URL; a unit that was running when
    the experiment was stopped shows as stopped; a Stop notice of another job is not shown."""
    import os

    from threeds.rundir.progress import write_status

    exp = make_experiment(demo)
    other = make_experiment(demo, "other")
    os.utime(other, (exp.stat().st_mtime + 10,) * 2)  # the newest: the one a plain visit opens
    units = json.loads((exp / "units.json").read_text())
    units["rand/seed0"]["eval"] = "running"
    (exp / "units.json").write_text(json.dumps(units))
    write_status(exp, "stopped", exit_code=143, pid=12345)
    at = app()
    at.query_params.update(run="demo", experiment="sel-vs-rand", item="q4")
    at.session_state["job_stops"] = {str(exp): (999999, "stopped (SIGINT): from another job")}
    at.switch_page("app_pages/outcomes.py").run()
    assert not at.exception
    assert at.selectbox(key="outcomes_experiment").value == "sel-vs-rand"
    assert "Item `q4`: the prompt exactly as the model read it" in texts(at.caption)
    assert "Question 4?" in [c.value for c in at.code]
    table = next(d.value for d in at.dataframe if "train s" in d.value.columns)
    assert table["eval"].tolist() == ["done", "stopped"]
    assert "Stopped by the user (ended by SIGTERM after SIGINT went unheeded)" in texts(at.warning) and not at.info
    assert dict(at.query_params).items() >= {"run": "demo", "experiment": "sel-vs-rand", "item": "q4"}.items()
    at = app().run()
    at.switch_page("app_pages/outcomes.py").run()  # a plain visit: the newest experiment, no item
    assert at.selectbox(key="outcomes_experiment").value == "other" and "item" not in dict(at.query_params)


def test_outcomes_page_shows_an_experiment_and_starts_one(demo, monkeypatch):
    from threeds.outcomes import report
    from threeds.outcomes.results import load_results

    exp = make_experiment(demo)
    at = open_page("app_pages/outcomes.py")
    assert at.selectbox(key="outcomes_experiment").value == "sel-vs-rand"
    results = load_results(exp)
    arms = next(d.value for d in at.dataframe if "accuracy % (95% CI)" in d.value.columns)
    expected = report.arm_rows(results.described, results.summary)
    assert arms["arm"].tolist() == ["sel", "rand"]
    assert arms["accuracy % (95% CI)"][0] == f"{report.pct(expected[0]['acc'])} ({report.pct(expected[0]['acc_lo'])}–{report.pct(expected[0]['acc_hi'])})"
    assert arms["accuracy % (95% CI)"][0].startswith("75.0") and arms["vs baseline, points (95% CI)"][1] == "baseline"
    subjects = next(d.value for d in at.dataframe if "subject" in d.value.columns and "n" in d.value.columns)
    assert subjects.to_dict("list") == {"subject": ["anatomy", "virology"], "n": [4, 4], "sel": [1.0, 0.5], "rand": [0.75, 0.0]}
    disagree = next(d.value for d in at.dataframe if "gold" in d.value.columns and "id" in d.value.columns)
    assert disagree["id"].tolist() == ["q3", "q4", "q5"]  # where sel is right and rand is not
    assert "embedded SmolLM2-135M" in texts(at.warning) and "Tiny training sets (6 records" in texts(at.warning)
    units = next(d.value for d in at.dataframe if "train s" in d.value.columns)
    assert units["eval s"].tolist() == [9.0, 9.0]

    started = []
    monkeypatch.setattr("threeds.rundir.jobs.start_run", lambda argv, run_dir, cwd=None: started.append((argv, run_dir)) or 1)
    at.session_state["selection"] = dataclasses.replace(at.session_state["selection"], sample_num=3)  # the sidebar: pick 3
    at.text_area(key="exp_arms").set_value("a=current\nb=random:50")
    at.text_input(key="exp_name").set_value("second")
    at.number_input(key="exp_batch").set_value(2)
    at.selectbox(key="exp_format").set_value("letters")
    at.button(key="exp_start").click().run()
    assert not at.exception and not at.error
    argv, run_dir = started[0]
    assert run_dir == demo / "experiments" / "second"
    # `current` is the sidebar's selection, frozen at Start as a preset: what the user sees is what trains
    assert argv[argv.index("experiment"):] == ["experiment", "--run", str(demo), "--name", "second", "--arm",
                                                "a=preset:second-current", "--arm", "b=random:50", "--limit", "200",
                                                "--prompt-format", "letters", "--batch-size", "2"]  # fmt: skip
    assert load_preset(demo, "second-current").sample_num == 3
    at.text_area(key="exp_arms").set_value("a=random:same").run()  # checked as it is typed: Start is off, saying why
    assert at.button(key="exp_start").disabled and "cannot be first" in texts(at.warning) and len(started) == 1
    at.text_area(key="exp_arms").set_value("a=current")
    at.number_input(key="exp_batch").set_value(0)
    at.number_input(key="exp_seeds").set_value(-1).run()  # the ranges are the config's, as on the command line
    assert "**Seeds**: must be within 1-1000" in texts(at.warning) and "**Batch size**: must be at least 1" in texts(at.warning)
    assert at.button(key="exp_start").disabled
    assert len(started) == 1 and at.selectbox(key="exp_bench").options == ["mmlu-medical", "pubmedqa"]
