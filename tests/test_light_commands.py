"""Light commands start without torch or transformers (issue 25, item 7): `threeds --help`, every
command's `--help`, `threeds filter` and `threeds select` on a CPU (k-center runs on numpy there)."""

from __future__ import annotations

import importlib.util
import os
import re
import json
import subprocess
import sys

from conftest import ROOT
from synthetic_run import make_run

from threeds.commands import COMMANDS

HEAVY = ("torch", "transformers")
# Runs `threeds` with each argument list in turn in one fresh process, then prints the exit codes
# and which heavy modules were imported (one JSON line).
PROBE = """
import contextlib, io, json, sys
from threeds.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as exc:  # --help
            codes.append(exc.code)
print(json.dumps({"codes": codes, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def imports_of(*argvs: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_imports_no_torch():
    present = [name for name in COMMANDS if importlib.util.find_spec(f"threeds.commands.{name}") is not None]
    assert {"rate", "filter", "generate", "score", "select", "run"} <= set(present)
    argvs = [["--help"], *([name.replace("_", "-"), "--help"] for name in present)]  # module proxy_check: proxy-check
    assert imports_of(*argvs) == {"codes": [0] * len(argvs), "heavy": []}


def test_select_and_filter_import_no_torch(tmp_path):
    run = make_run(tmp_path / "run", n=60, stages=("rate", "score"))
    select = ["select", "--run", str(run), "--out", str(tmp_path / "sel.json"), "--sample-num", "5", "--low-th", "0",
              "--up-th", "100"]  # fmt: skip
    keep = ["filter", "--data", str(run / "data.jsonl"), "--ratings", str(run / "ratings.jsonl"), "--out",
            str(tmp_path / "kept.jsonl")]  # fmt: skip
    assert imports_of(select, keep) == {"codes": [0, 0], "heavy": []}
    assert len(json.loads((tmp_path / "sel.json").read_text())) == 5
    assert (tmp_path / "kept.jsonl").read_text().count("\n") > 0


# Opens the app (the Runs page) and then each page named in argv[2], in one fresh process; prints each
# page's exceptions and which heavy modules were imported (one JSON line).
APP_PROBE = """
import json, sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=300).run()
errors = {"runs": [str(e.value) for e in at.exception]}
for page in json.loads(sys.argv[2]):
    at.switch_page(page).run()
    errors[page] = [str(e.value) for e in at.exception]
print(json.dumps({"errors": errors, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def test_every_app_page_draws_without_torch(tmp_path):
    """Importing torch and transformers takes seconds: a page that imports them (the Runs form
    checking the model spec did) delays every first visit of the app by that much."""
    make_run(tmp_path / "cache" / "demo", n=40, n_dropped=10)
    pages = re.findall(r'st\.Page\(\s*"(app_pages/[a-z_]+\.py)"', (ROOT / "app.py").read_text())
    pages += ["app_pages/inspector.py"]  # named by a constant in app.py
    assert len(pages) >= 9
    done = subprocess.run([sys.executable, "-c", APP_PROBE, str(ROOT / "app.py"), json.dumps(pages)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=os.environ | {"THREEDS_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"errors": {page: [] for page in ["runs", *pages]}, "heavy": []}
