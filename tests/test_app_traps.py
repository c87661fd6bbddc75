"""The app's last traps (issue 32): a corrupt experiment file on the Outcomes page, a link that would
inflate to gigabytes, start forms that launch a run bound to fail, a retry that fixes nothing, view
state missing from the URL, a histogram coloured by its bins' centres, Export's order-blind compare."""

from __future__ import annotations

import base64
import json
import re
import resource
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from conftest import ROOT
from streamlit.testing.v1 import AppTest
from synthetic_run import make_experiment, make_run
from test_app import cache, demo  # noqa: F401 (fixtures)

from app_pages import state as app_state
from threeds.selection.apply import SelectionError


def open_page(page: str, **state) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    for key, value in state.items():
        at.session_state[key] = value
    at.switch_page(page).run()
    assert not at.exception, at.exception[0].value if at.exception else None
    return at


def texts(elements) -> str:
    return re.sub(r"\\(.)", r"\1", "\n".join(str(e.value) for e in elements))  # the markdown source, unescaped


# ------------------------------------------------------------------------------ Outcomes: corrupt files


def _truncate(path):
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


CORRUPTIONS = {
    "summary.json truncated": ("summary.json", _truncate),
    "summary.json: arms a list": ("summary.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "arms": [1]}))),
    "summary.json: acc text": ("summary.json", lambda p: p.write_text(p.read_text().replace('"acc": 0.75', '"acc": "x"'))),
    "units.json: a list": ("units.json", lambda p: p.write_text("[]")),
    "units.json: seed text": ("units.json", lambda p: p.write_text(p.read_text().replace('"seed": 0', '"seed": "0"'))),
    "items.jsonl: a row twice": ("evals/sel/seed0/items.jsonl", lambda p: p.write_text(p.read_text() + p.read_text().splitlines()[0] + "\n")),
    "items.jsonl: not JSON": ("evals/rand/seed0/items.jsonl", lambda p: p.write_text("{oops\n{}\n")),
    "items.jsonl: gold missing": ("evals/rand/seed0/items.jsonl", lambda p: p.write_text(p.read_text().replace('"gold": 0, ', ""))),
    "experiment.json: arms text": ("experiment.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "arms": "sel"}))),
    "experiment.json: binary": ("experiment.json", lambda p: p.write_bytes(b"\x00\xff\xfe")),
    "loss.jsonl: step text": ("arms/sel/seed0/loss.jsonl", lambda p: p.write_text('{"step": "one", "loss": 2}\n')),
    "loss.jsonl: truncated mid-file": ("arms/rand/seed0/loss.jsonl", lambda p: p.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1}\n')),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corrupt_experiment_file_is_one_line_and_the_start_form_stays(name, demo):
    exp = make_experiment(demo)
    file, corrupt = CORRUPTIONS[name]
    corrupt(exp / file)
    at = open_page("app_pages/outcomes.py")
    errors = texts(at.error)
    assert "cannot be shown" in errors and file.rsplit("/", 1)[-1] in errors and "\n" not in errors.strip(), errors
    assert at.button(key="exp_start") is not None and at.text_area(key="exp_arms").value  # the Start form is drawn


# ------------------------------------------------------------------------------ a link's brush


def test_a_brush_link_that_would_inflate_to_gigabytes_is_refused_at_once(demo):
    bomb = base64.urlsafe_b64encode(zlib.compress(b"\xff" * (10 * 2**20), 9)).decode().rstrip("=")  # 10 MB of ones: 84M rows
    assert len(bomb) < 20_000
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    with pytest.raises(SelectionError, match="names rows past 4,194,304"):
        app_state.decode_rows(bomb)
    assert time.monotonic() - started < 2 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # kB
    with pytest.raises(SelectionError, match="is not a brush this app wrote"):
        app_state.decode_rows(app_state.encode_rows(np.arange(0, 3000, 7))[:12])  # cut short
    rows = np.array([0, 5, 4_000_000])
    assert app_state.decode_rows(app_state.encode_rows(rows)).tolist() == rows.tolist()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params.update({"run": "demo", "brush": bomb})
    at.run()
    assert not at.exception and "names rows past" in texts(at.sidebar.warning)


# ------------------------------------------------------------------------------ start forms check the model


@pytest.mark.parametrize("model, words", [
    ("{tmp}/nope", "no such file or directory"), ("{tmp}", "no config.json"), ("{tmp}/d.jsonl", "not a GGUF file"),
    ("some-org/uncached-model", "nor a hub id in the local Hugging Face cache"),
])  # fmt: skip
def test_the_runs_form_checks_the_model_before_it_launches(model, words, demo, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "d.jsonl").write_text("{}\n")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.radio(key="new_source").set_value("Path on this machine").run()
    at.text_input(key="new_path").set_value(str(demo / "input.jsonl")).run()
    assert not at.button(key="new_start").disabled
    at.text_input(key="new_model").set_value(model.format(tmp=tmp_path)).run()
    shown = texts(at.warning)
    assert at.button(key="new_start").disabled and "**Model**" in shown and words in shown, shown


def test_the_outcomes_form_checks_as_it_is_filled_in(demo, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr("threeds.rundir.jobs.start_run", lambda argv, run_dir, cwd=None: started.append(argv) or 1)
    at = open_page("app_pages/outcomes.py")
    assert not at.button(key="exp_start").disabled
    at.text_area(key="exp_arms").set_value("a=random:same").run()  # no click: checked as it is typed
    assert at.button(key="exp_start").disabled and "cannot be first" in texts(at.warning)
    at.text_area(key="exp_arms").set_value("a=current\nb=random:same").run()
    at.text_input(key="exp_name").set_value("bad name!").run()
    assert at.button(key="exp_start").disabled and "**Arms and name**: --name 'bad name!'" in texts(at.warning)
    at.text_input(key="exp_name").set_value("good").run()
    manifest = json.loads((demo / "manifest.json").read_text())
    manifest.setdefault("stages", {}).setdefault("score", {}).setdefault("config", {})["model"] = str(tmp_path / "gone")
    (demo / "manifest.json").write_text(json.dumps(manifest))
    at = open_page("app_pages/outcomes.py")
    assert at.button(key="exp_start").disabled and "the run's model: --model" in texts(at.warning) and "gone" in texts(at.warning)
    assert started == []


# ------------------------------------------------------------------------------ Retry and end states


def test_a_retry_that_fixes_nothing_keeps_the_amber_state_and_the_failed_list(demo, tmp_path, caplog):
    """A run done with failures whose retry stops on an error (here: its input file gone) stays done
    with failures, lists its failed records and says why the retry stopped; the run list says it in words."""
    from threeds import cli
    from threeds.rundir.progress import read_status, write_status

    log = demo / "ratings.jsonl"
    failures = {"rate": {"failed": 1, "total": 4, "log": str(log), "first": [{"id": "s000001", "error": "no score"}]}}
    write_status(demo, "done_with_failures", exit_code=3, error="done with failures: 1 of 4 ratings failed", failures=failures)
    gone = tmp_path / "gone.jsonl"
    argv = ["run", "--data", str(gone), "--out", str(demo)]
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (demo / "job.json").write_text(json.dumps({"pid": int(ended.stdout), "argv": [sys.executable, "-m", "threeds", *argv]}))
    assert cli.main(argv) == 5  # what Retry starts: the same command
    status = read_status(demo)
    assert status["state"] == "done_with_failures" and status["failures"] == failures and status["exit_code"] == 3
    assert str(gone) in status["retry_error"] and "no such file" in status["retry_error"]
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["run_name"] = "demo"
    at.run()
    shown = texts(at.warning)
    assert "Done with failures (exit code 3): 1 of 4 ratings failed" in shown and "The last retry stopped" in shown and str(gone) in shown
    assert at.button(key="resume_run").label == "Retry failed" and not at.error
    assert "s000001" in at.dataframe[1].value["id"].tolist()  # the failed list stays
    assert at.dataframe[0].value.set_index("run").loc["demo", "state"] == "done with failures"


# ------------------------------------------------------------------------------ view state in the URL


def test_a_pasted_samples_link_shows_the_same_rows(demo):
    at = open_page("app_pages/samples.py")
    at.multiselect(key="samples_verdict").set_value(["picked"]).run()
    at.selectbox(key="samples_sort").set_value("quality").run()
    params = dict(at.query_params)
    assert params["verdict"] == "picked" and params["sort"] == "quality"
    shown = at.dataframe[0].value["id"].tolist()
    assert 0 < len(shown) < 40
    again = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    again.query_params.update(params)
    again.run()
    again.switch_page("app_pages/samples.py").run()
    assert again.dataframe[0].value["id"].tolist() == shown and again.multiselect(key="samples_verdict").value == ["picked"]
    odd = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)  # a hand-edited link: unknown values dropped
    odd.query_params.update({**params, "verdict": "picked,bogus", "sort": "nope"})
    odd.run()
    odd.switch_page("app_pages/samples.py").run()
    assert not odd.exception and odd.multiselect(key="samples_verdict").value == ["picked"]
    assert odd.selectbox(key="samples_sort").value == "pick rank"


def test_the_difficulty_log_x_is_in_the_link(demo):
    at = open_page("app_pages/difficulty.py")
    at.toggle(key="ins_ppl_log").set_value(True).run()
    assert at.query_params["logx"] == "1"
    again = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    again.query_params.update(dict(at.query_params))
    again.run()
    again.switch_page("app_pages/difficulty.py").run()
    assert again.toggle(key="ins_ppl_log").value is True


# ------------------------------------------------------------------------------ Quality bins, Export compare


def test_quality_bins_are_coloured_by_the_scores_in_them():
    from threeds.selection.quality import kept_per_bin as kept_counts

    scores = np.array([90.0, 90.0, 91.0, 95.0, np.nan, 10.0])
    edges = np.linspace(0, 100, 51)
    kept = kept_counts(scores, 91.0, edges)
    assert kept[45] == 1 and kept[47] == 1 and kept.sum() == 2  # the bin 90-92 holds one kept score (91), not three
    none = kept_counts(np.array([90.0, 90.5]), 91.0, edges)
    assert none.sum() == 0  # threshold 91, nothing kept: no green bar


def test_export_compares_ids_as_sets_and_order_apart():
    from threeds.views.export import compare_selections as compare_text

    assert compare_text(["a", "b"], ["a", "b"]).endswith("identical, in the same order.")
    assert compare_text(["b", "a"], ["a", "b"]).endswith("the same samples, in another order (pick order here).")
    assert compare_text(["a", "c"], ["a", "b", "d"]).endswith("differs: 2 samples only here, 1 only in selection.json.")
