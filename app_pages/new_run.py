"""The Runs page's form that starts a new run: checked as it is filled in, with the CLI's rules.

The settings become the `RunConfig` the launcher starts, and `threeds.config.problems` (the checks
`threeds run` applies to its flags) says what is wrong with it, so the form cannot start a run the
command line would refuse. The data file is read at once with the reader the run uses
(`threeds.io.data.read_records`), an upload under its own name, so a bad line is named before
anything starts, and the model is checked as the loader will (`threeds.model.files.model_problem`: it
exists, is a model directory, a GGUF file or a hub id in the local cache). Start stays disabled while
anything is wrong, and says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import warnings
from pathlib import Path

import streamlit as st

import threeds
from app_pages import common
from threeds.config import (
    BackendConfig,
    DataConfig,
    FilterConfig,
    GenerateConfig,
    ModelConfig,
    RateConfig,
    RunConfig,
    SelectConfig,
    SubsetConfig,
    problems,
    run_command,
)  # fmt: skip
from threeds.errors import ThreedsError
from threeds.io.data import read_records
from threeds.model.files import model_problem
from threeds.rundir import jobs
from threeds.rundir.read import NOT_RUNS
from threeds.stages.rate import PROMPT_NAMES

SAMPLE_DATA = Path(threeds.__file__).parent / "sample_data"
DATA_TYPES = ["json", "jsonl", "parquet", "csv"]
SUBSETS = {"first N records": "limit", "N random records": "sample", "all records": None}
PROMPT_AUTO = "auto (from the data's language)"
# The form's label of each RunConfig field it sets (`problems` keys them `part.field`).
LABELS = {
    "subset.limit": "N", "subset.sample": "N", "subset.sample_seed": "Random seed",
    "model.model": "Model", "backend.base_url": "OpenAI-compatible base URL", "backend.batch_size": "Batch size",
    "generate.max_new_tokens": "Max new tokens (A')", "filter.quality_threshold": "Quality threshold",
    "select.low_th": "Band low %", "select.up_th": "Band high %", "select.sample_num": "sample_num",
}  # fmt: skip


@st.fragment
def start_form() -> None:
    """A fragment: a change in the form reruns the form alone, not the run table and panel above it."""
    st.header("Start a new run")
    data, shown = data_choice()
    rename = st.checkbox(
        "Keep records whose id repeats (rename them <id>#2, …)", value=True, key="new_rename",
        help="off: a repeated id stops the run with an error naming both records (the bundled MedQuAD sample has one)",
    )  # fmt: skip
    wrong = data_problems(data, shown, "rename" if rename else "error")
    taken = set(common.run_names())
    st.session_state.setdefault("new_name", next(f"run-{i}" for i in range(1, len(taken) + 2) if f"run-{i}" not in taken))
    name = st.text_input("Run name", key="new_name")
    config = form_config(rename)
    wrong |= name_problems(name) | model_problems(config.model.model)
    wrong |= {LABELS.get(key, key): message for key, message in problems(config).items()}
    start = st.button("Start run", type="primary", key="new_start", disabled=bool(wrong))
    if wrong:
        st.warning("**Start is disabled until these are fixed:**\n" + "\n".join(f"- **{label}**: {common.md(m)}" for label, m in wrong.items()))
    if start and not wrong:
        out = common.cache_dir() / name
        if start_background(run_command(data, out, config), out):
            common.switch_run(name)


def form_config(rename: bool) -> RunConfig:
    """The form's settings as the RunConfig the launcher starts (numbers unbounded here: the
    config's own checks name a value out of range, where a bounded input would just not take it)."""
    model = st.text_input(
        "Model (empty: the embedded SmolLM2-135M)", placeholder="local dir, .gguf or hub id", key="new_model",
        help="scores Stage 2; with the local backend it also rates (Stage 1) and writes A'",
    )  # fmt: skip
    c1, c2, c3 = st.columns(3)
    subset = c1.selectbox("Records", list(SUBSETS), key="new_subset", help="start small: try the settings on a few records first")
    n = c2.number_input("N", value=20, step=1, key="new_n")
    seed = c3.number_input("Random seed (N random records)", value=SubsetConfig.sample_seed, step=1, key="new_sample_seed")
    backend = st.radio("Stage 1 rating and A' generation", ["local", "openai"], horizontal=True, key="new_backend")
    c1, c2 = st.columns(2)
    base_url = c1.text_input("OpenAI-compatible base URL", placeholder=f"{BackendConfig.base_url} (default)", key="new_base_url")
    api_model = c2.text_input("Server model name", placeholder="the server's only model (default)", key="new_api_model")
    c1, c2, c3, c4 = st.columns(4)
    prompt = c1.selectbox("Rating prompt", [PROMPT_AUTO, *PROMPT_NAMES], key="new_prompt",
                          help="auto: zh-medical (the paper's setting) for Chinese data, en-medical otherwise")  # fmt: skip
    max_new = c2.number_input("Max new tokens (A')", value=GenerateConfig.max_new_tokens, step=1, key="new_max_new_tokens", help="longest A' in tokens")
    batch = c3.number_input("Batch size", value=BackendConfig.batch_size, step=1, key="new_batch_size", help="local backend: prompts generated together")
    dtype = c4.selectbox("dtype", choices(ModelConfig, "dtype"), key="new_dtype",
                         help="auto: float32 on CPU, bfloat16 on GPU")  # fmt: skip
    c1, c2, c3, c4, c5 = st.columns(5)
    threshold = c1.number_input("Quality threshold", value=FilterConfig.quality_threshold, step=1.0, key="new_threshold")
    low = c2.number_input("Band low %", value=SelectConfig.low_th, step=1.0, key="new_low")
    up = c3.number_input("Band high %", value=SelectConfig.up_th, step=1.0, key="new_up")
    sample_num = c4.number_input("sample_num", value=SelectConfig.sample_num, step=1, key="new_sample_num")
    atten = c5.selectbox("Attention", choices(SelectConfig, "atten_method"), key="new_atten")
    server = {"base_url": base_url.strip() or BackendConfig.base_url, "api_model": api_model.strip() or None}
    how = SUBSETS[subset]
    return RunConfig(
        data=DataConfig("rename" if rename else "error"),
        subset=SubsetConfig(limit=int(n) if how == "limit" else None, sample=int(n) if how == "sample" else None,
                            sample_seed=int(seed) if how == "sample" else 0),
        model=ModelConfig(model=model.strip() or None, dtype=dtype),
        backend=BackendConfig(backend=backend, **(server if backend == "openai" else {"batch_size": int(batch)})),
        rate=RateConfig(prompt="auto" if prompt == PROMPT_AUTO else prompt),
        filter=FilterConfig(float(threshold)), generate=GenerateConfig(int(max_new)),
        select=SelectConfig(low_th=float(low), up_th=float(up), sample_num=int(sample_num), atten_method=atten),
    )  # fmt: skip


def choices(cls: type, name: str) -> tuple[str, ...]:
    return next(f.metadata["choices"] for f in dataclasses.fields(cls) if f.name == name)


def start_background(argv: list[str], run_dir: Path) -> bool:
    """Start the run, or say in one line why not (another writer holds the run directory)."""
    try:
        jobs.start_run(argv, run_dir)
    except (ThreedsError, OSError) as exc:
        st.error(common.md(common.one_line_error(exc)))
        return False
    return True


def data_choice() -> tuple[str, str]:
    """(the data file chosen, the name to call it by): bundled sample, upload or a path; '' when none yet."""
    # English first: the embedded model is English.
    samples = sorted((p.name for p in SAMPLE_DATA.glob("*") if p.suffix.lstrip(".") in DATA_TYPES), key=lambda n: ("_en" not in n, n))
    source = st.radio("Data", ["Sample data", "Upload", "Path on this machine"], horizontal=True, key="new_source")
    if source == "Sample data":
        if not samples:
            st.warning(f"No sample data found in {SAMPLE_DATA}.")
        choice = st.selectbox("Sample data set", samples, key="new_sample")
        return (str(SAMPLE_DATA / choice), choice) if choice else ("", "")
    if source == "Upload":
        upload = st.file_uploader("Data set", type=DATA_TYPES, key="new_upload")
        return (save_upload(upload), Path(upload.name).name) if upload else ("", "")
    path = st.text_input("Data file", key="new_path", placeholder="/path/to/data.jsonl")
    return path.strip(), path.strip()


def name_problems(name: str) -> dict[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        return {"Run name": "letters, digits, '.', '_' and '-' only, starting with a letter or digit"}
    if name in common.run_names() or name in NOT_RUNS:
        return {"Run name": f"a run named {name!r} exists; pick it in the sidebar (and resume it there) or choose another name"}
    return {}


def model_problems(spec: str | None) -> dict[str, str]:
    """What the run's model loader would refuse about `spec` (`threeds.model.files.model_problem`), found
    before the run starts: a missing path, a plain folder, a file that is not GGUF, an uncached hub id."""
    problem = model_problem(spec) if spec else None
    return {"Model": problem.removeprefix(f"--model {spec}: ")} if problem else {}


def data_problems(path: str, shown: str, duplicate_ids: str) -> dict[str, str]:
    """What reading the data file as the run will finds wrong with it (named as the user knows it);
    the count of records when nothing is."""
    if not path:
        return {"Data": "choose a file"}
    if not Path(path).is_file():
        return {"Data": f"no such file: {path}"}
    stat = Path(path).stat()
    count, rejects, error, notes = read_check(path, (stat.st_mtime_ns, stat.st_size), duplicate_ids)
    if error is not None:
        return {"Data": error.replace(str(Path(path)), shown)}
    if count == 0:
        return {"Data": f"{shown}: no usable record ({rejects:,} set aside as blank)"}
    aside = f"; {rejects:,} set aside (blank texts), listed in the run's rejects.jsonl" if rejects else ""
    told = "".join(f"  \n{common.md(note.replace(str(Path(path)), shown))}" for note in notes)
    st.caption(f"{common.md(shown)}: {count:,} records{aside}{told}")
    return {}


@st.cache_data(max_entries=8, show_spinner="Reading the data file…")
def read_check(path: str, stamp: tuple, duplicate_ids: str) -> tuple[int, int, str | None, tuple[str, ...]]:
    """(records, rejects, the one-line error, what the reader warned of: renamed ids) of reading
    `path` as the run will; once per file version."""
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        try:
            records, rejects = read_records(path, duplicate_ids)
        except (ThreedsError, OSError) as exc:
            return 0, 0, common.one_line_error(exc), ()
    return len(records), len(rejects), None, tuple(str(w.message) for w in told)


def save_upload(upload) -> str:
    """Store an upload under cache/uploads/<content hash>/<its own name> so the background run can
    read it and names it as the user does; the hash keeps a later upload of the same name from
    changing a running job's input."""
    data = upload.getbuffer()
    target = common.cache_dir() / "uploads" / hashlib.sha256(data).hexdigest()[:12] / Path(upload.name).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return str(target)
