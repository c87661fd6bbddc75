"""Outcomes: does the selection help? Start an experiment (arms x seeds, trained and evaluated in the
background), follow it, and read its result: the arms with their statistics, loss curves, subjects,
the items where the arms disagree, and the report."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages import common, job_panel
from app_pages import state as app_state
from app_pages.new_run import start_background
from threeds.config import ExperimentConfig, TrainConfig, problems, to_argv
from threeds.errors import SettingsError, ThreedsError
from threeds.model.files import model_problem
from threeds.outcomes import pace, report
from threeds.outcomes.arms import parse_arms
from threeds.outcomes.benchsets import BUNDLED
from threeds.outcomes.results import Results, experiment_dir, list_experiments, load_results
from threeds.rundir import layout
from threeds.rundir.check import stage_part
from threeds.rundir.jobs import job_running
from threeds.rundir.read import Run, read_progress
from threeds.selection.apply import SelectionError, list_presets, load_preset, save_preset

# The form's label of each field it sets (`problems` keys them by field name).
LABELS = {"limit": "Items", "seeds": "Seeds", "batch_size": "Batch size", "grad_accum": "Grad accumulation", "epochs": "Epochs"}


def outcomes_page() -> None:
    st.title("Outcomes: does the selection help?")
    run = common.require_run()
    st.caption("Train the run's model with LoRA on each selection (an *arm*), evaluate every arm on a multiple-choice "
               "exam and compare them with the baseline, with confidence intervals and a paired test.")  # fmt: skip
    names = list_experiments(run.path)
    if names:
        if st.session_state.get("outcomes_next") in names:
            st.session_state[app_state.EXPERIMENT] = st.session_state.pop("outcomes_next")
        name = st.selectbox("Experiment", names, key=app_state.EXPERIMENT)
        exp = experiment_dir(run.path, name)
        st.fragment(status_panel, run_every=2 if job_running(exp) else None)(str(exp))
        results = read_results(exp)
        if results is not None:
            try:
                show_results(exp, results)
            except (ThreedsError, OSError) as exc:  # a training's loss.jsonl, read as the chart is drawn
                st.error(f"Experiment {common.code(exp.name)} cannot be shown: {common.md(common.one_line_error(exc))}")
    else:
        st.info(f"Run {common.code(run.name)} has no experiment yet: start one below.")
    start_form(run, names)


def run_model(run: Run) -> str | None:
    """The run's target model as its score stage recorded it (None: the embedded one), which every arm trains."""
    model = stage_part(run.manifest, "score", "config").get("model")
    return model if isinstance(model, str) else None


def status_panel(path: str) -> None:
    """State, progress with time left, each arm x seed's state and time, Stop/Resume, the log."""
    job = job_panel.job_of(path)
    results = read_results(job.directory, quiet=True)
    if results is None:
        return
    progress = read_progress(job.directory) or {}
    if job.running and progress:
        done, total = int(progress.get("done", 0)), int(progress.get("total", 0))
        st.progress(min(done / total, 1.0) if total else 0.0, text=common.progress_text(progress) + experiment_left(results, progress))
    if results.units:
        st.dataframe(pd.DataFrame(unit_rows(results.units, job)), hide_index=True, width="stretch")
    job_panel.controls(job, ("outcomes_stop", "outcomes_resume"), "finished arms are kept, a training resumes from its checkpoint",
                       resumable=job.state in ("failed", "stopped", "killed"))  # fmt: skip
    job_panel.command_and_log(job, expanded=job.state not in ("done", "unknown"))
    job_panel.rerun_when_ended(job)  # finished: draw the results


def unit_rows(units: dict, job: job_panel.Job) -> list[dict]:
    """units.json as the table shows it: a phase recorded as running when the experiment no longer
    runs shows how the experiment ended (stopped, failed, killed)."""
    def shown(value: str | None) -> str:
        return job.state if value == "running" and not job.running else value or "todo"

    return [{"arm": u["arm"], "seed": u["seed"], "records": u.get("records"), "train": shown(u.get("train")),
             "train s": u.get("train_s"), "eval": shown(u.get("eval")), "eval s": u.get("eval_s")} for u in units.values()]  # fmt: skip


def experiment_left(results, progress: dict) -> str:
    """' · about N min left for the experiment' (`threeds.outcomes.pace`), from the first unit on."""
    left = pace.time_left(results.described, results.units, progress)
    if left is None:
        return " · the time left is known after the first step"
    text = f" · {'at least' if left.unmeasured else 'about'} {common.duration(max(left.seconds, 1.0))} left for the experiment"
    return text + (f" ({' and '.join(left.unmeasured)} not measured yet)" if left.unmeasured else "")


def read_results(exp: Path, quiet: bool = False) -> Results | None:
    """The experiment's files, or None after one line naming the damaged file (the page and its Start
    form stay usable: a hand-edited or truncated file is the user's to fix, not a traceback)."""
    try:
        return load_results(exp)
    except (ThreedsError, OSError) as exc:
        if not quiet:
            st.error(f"Experiment {common.code(exp.name)} cannot be shown: {common.md(common.one_line_error(exc))}")
        return None


def show_results(exp: Path, results: Results) -> None:
    if results.summary is None:
        st.caption("No result yet: the statistics appear when every arm is evaluated.")
        return
    described, summary = results.described, results.summary
    caveats = report.caveats(described, summary, results.units)
    if caveats:
        st.warning("**What this experiment cannot say**\n\n" + "\n".join(f"- {c}" for c in caveats), icon=":material/info:")
    st.subheader("Arms")
    rows = report.arm_rows(described, summary)
    arms_table(rows, summary)
    st.plotly_chart(accuracy_chart(rows, summary), width="stretch", key="outcomes_chart")
    losses = results.losses(exp)
    if losses:
        st.subheader("Training loss")
        st.plotly_chart(loss_chart(losses), width="stretch", key="outcomes_loss")
    st.subheader("By subject")
    subjects = pd.DataFrame(report.subject_table(summary))
    st.dataframe(subjects, hide_index=True, width="stretch",
                 column_config={arm: st.column_config.NumberColumn(arm, format="percent") for arm in results.evals})  # fmt: skip
    disagreement_panel(results.evals)
    c1, c2 = st.columns(2)
    c1.download_button("Report (Markdown)", report.markdown(described, summary), f"{exp.name}-{layout.REPORT_MD}", "text/markdown", key="outcomes_md")
    c2.download_button("Report (CSV)", report.csv_text(summary, described), f"{exp.name}-{layout.REPORT_CSV}", "text/csv", key="outcomes_csv")


def arms_table(rows: list[dict], summary: dict) -> None:
    baseline = summary.get("baseline")
    table = pd.DataFrame([{
        "arm": r["arm"], "SPEC": r["spec"], "records": r["records"], "n items": r["n_items"],
        "accuracy % (95% CI)": f"{report.pct(r['acc'])} ({report.pct(r['acc_lo'])}–{report.pct(r['acc_hi'])})",
        "vs baseline, points (95% CI)": report.versus_text(r, baseline), "items that differ": r["differ"] or "—",
        "p (Holm)": report.p_text(r["p_holm"]), "verdict": r["verdict"],
    } for r in rows])  # fmt: skip
    st.dataframe(table, hide_index=True, width="stretch")
    st.caption(f"Baseline **{common.md(baseline)}**; {summary.get('n_items')} items; always answering the most common "
               f"gold letter scores {report.pct(summary.get('majority_acc'))}%. Accuracy CI: bootstrap over items; "
               "difference CI: Newcombe's for paired proportions; p: exact McNemar on the items where the two arms "
               "differ, Holm-corrected across arms.")  # fmt: skip
    if summary.get("plan"):
        st.caption(common.md(report.planning_text(summary)))


def accuracy_chart(rows: list[dict], summary: dict) -> go.Figure:
    acc = [100 * (r["acc"] or 0) for r in rows]
    bars = go.Bar(
        x=[r["arm"] for r in rows], y=acc, name="accuracy",
        error_y=dict(type="data", symmetric=False, array=[100 * (r["acc_hi"] or 0) - a for r, a in zip(rows, acc, strict=True)],
                     arrayminus=[a - 100 * (r["acc_lo"] or 0) for r, a in zip(rows, acc, strict=True)]),
        hovertemplate="%{x}: %{y:.1f}%<extra></extra>",
    )  # fmt: skip
    figure = go.Figure([bars], layout=dict(height=320, margin=dict(l=10, r=10, t=30, b=10), yaxis_title="accuracy % (95% CI)",
                                           title="Accuracy per arm"))  # fmt: skip
    if summary.get("majority_acc") is not None:
        figure.add_hline(y=100 * summary["majority_acc"], line_dash="dot", annotation_text="most common answer")
    return figure


def loss_chart(losses: list[dict]) -> go.Figure:
    frame = pd.DataFrame(losses)
    traces = [go.Scatter(x=part["step"], y=part["loss"], mode="lines+markers", name=f"{arm} seed {seed}")
              for (arm, seed), part in frame.groupby(["arm", "seed"], sort=False)]  # fmt: skip
    return go.Figure(traces, layout=dict(height=280, margin=dict(l=10, r=10, t=10, b=10), xaxis_title="optimizer step",
                                         yaxis_title="loss (response tokens)", xaxis_dtick=1))  # fmt: skip


def disagreement_panel(evals: dict) -> None:
    rows = report.disagreements(evals)
    st.subheader(f"Items where the arms disagree ({len(rows)})")
    if not rows:
        st.caption("Every arm gave the same answer to every item.")
        return
    def pick() -> None:  # the row clicked is the item opened (and in the URL); none: closed
        chosen = st.session_state["outcomes_disagree"].selection.rows
        st.session_state[app_state.ITEM] = rows[chosen[0]]["id"] if chosen else None

    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", on_select=pick, selection_mode="single-row",
                 key="outcomes_disagree")  # fmt: skip
    item = st.session_state.get(app_state.ITEM)
    if item not in {r["id"] for r in rows}:
        st.caption("Click a row to see the question, its choices and each arm's probabilities.")
        return
    detail = report.item_detail(evals, item)
    st.caption(f"Item {common.code(item)}: the prompt exactly as the model read it, and each continuation it scored after it.")
    st.code(detail["prompt"], language=None, wrap_lines=True)
    table = pd.DataFrame({"continuation scored": [repr(c) for c in detail["choices"]], "gold": ["✓" if i == detail["gold"] else "" for i in range(len(detail["choices"]))],
                          **{arm: probs for arm, probs in detail["probs"].items()}})  # fmt: skip
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={arm: st.column_config.ProgressColumn(arm, min_value=0.0, max_value=1.0, format="percent")
                                for arm in detail["probs"]})  # fmt: skip


def freeze_current(run: Run, name: str, arm_lines: tuple[str, ...]) -> tuple[str, ...]:
    """The arms with every `current` replaced by the sidebar's selection, saved now as the preset
    `NAME-current` (what the user sees is what trains; experiment.json records the preset's settings)."""
    arms = parse_arms(arm_lines)
    if not any(a.kind == "current" for a in arms):
        return arm_lines
    preset, config = f"{name[:56]}-current", common.selection_config(run)
    if preset in list_presets(run.path) and name in list_experiments(run.path) and load_preset(run.path, preset) != config:
        raise SettingsError(f"experiment {name} trained `current` on another sidebar selection (preset {preset}): "
                            "give this one another name")  # fmt: skip
    save_preset(run.path, preset, config)
    return tuple(f"{a.name}=preset:{preset}" if a.kind == "current" else line for a, line in zip(arms, arm_lines, strict=True))


@st.fragment
def start_form(run: Run, taken: list[str]) -> None:
    """The settings, checked as they are filled in with the rules `threeds experiment` applies
    (`threeds.config.problems`, the arms, the name) and the run's model as its loader would: Start
    stays disabled, saying why, while anything is wrong (numbers unbounded here: the config names a
    value out of range, where a bounded input would just not take it)."""
    run_dir = run.path
    st.header("Start an experiment")
    st.caption("An arm `current` trains on the selection in the sidebar as it is when you press Start: it is saved as "
               "the preset *NAME-current* and recorded with the experiment (`threeds experiment` on the command line "
               "trains `current` on the run's selection.json instead).")  # fmt: skip
    c1, c2, c3 = st.columns(3)
    st.session_state.setdefault("exp_name", next(f"exp-{i}" for i in range(1, len(taken) + 2) if f"exp-{i}" not in taken))
    name = c1.text_input("Name", key="exp_name")
    bench = c2.selectbox("Evaluation set", BUNDLED, key="exp_bench")
    fmt = c2.selectbox("Prompt format", ["chat", "plain", "letters"], key="exp_format",
                       help="chat: the model's chat template, the choice as its reply; plain: 'Question: ... Answer:' "
                       "and the choice's text; letters: lm-evaluation-harness's MMLU prompt (options A-D, the "
                       "letter scored), the form published MMLU numbers use")  # fmt: skip
    limit = c3.number_input("Items (0: all)", value=200, step=1, key="exp_limit", help="spread evenly over the set")
    arms = st.text_area("Arms, one NAME=SPEC a line", "selection=current\nrandom=random:same", key="exp_arms",
                        help="SPEC: current (the sidebar's selection, saved as the preset NAME-current when you press "
                        "Start), preset:NAME, random:same, random:length, random:N, quality, all, base (no training)")  # fmt: skip
    c1, c2, c3, c4, c5 = st.columns(5)
    baseline = c1.text_input("Baseline arm (empty: the random one)", key="exp_baseline",
                             help="the arm the others are compared with; empty: the first random arm, else the first arm")  # fmt: skip
    seeds = c2.number_input("Seeds", value=ExperimentConfig.seeds, step=1, key="exp_seeds")
    batch = c3.number_input("Batch size", value=TrainConfig.batch_size, step=1, key="exp_batch")
    accum = c4.number_input("Grad accumulation", value=TrainConfig.grad_accum, step=1, key="exp_accum",
                            help="batch x accumulation records per optimizer step: 64 by default (the paper's)")  # fmt: skip
    epochs = c5.number_input("Epochs", value=TrainConfig.epochs, step=1, key="exp_epochs")
    arm_lines = tuple(line.strip() for line in arms.splitlines() if line.strip())
    config = ExperimentConfig(name=name.strip(), arm=arm_lines, baseline=baseline.strip() or None, seeds=int(seeds),
                              bench=bench, limit=int(limit) or None, prompt_format=fmt)  # fmt: skip
    train = TrainConfig(batch_size=int(batch), grad_accum=int(accum), epochs=int(epochs))
    wrong = experiment_problems(run_dir, config, train, run_model(run))
    start = st.button("Start experiment", type="primary", key="exp_start", disabled=bool(wrong))
    if wrong:
        st.warning("**Start is disabled until these are fixed:**\n" + "\n".join(f"- **{label}**: {common.md(m)}" for label, m in wrong.items()))
    if not start or wrong:
        return
    exp = experiment_dir(run_dir, config.name)
    try:
        config = dataclasses.replace(config, arm=freeze_current(run, exp.name, arm_lines))
    except (SettingsError, SelectionError) as exc:
        st.error(f"**Not started:** {common.md(common.one_line_error(exc))}")
        return
    argv = [sys.executable, "-m", "threeds", "experiment", "--run", str(run_dir), *to_argv(config), *to_argv(train)]
    if start_background(argv, exp):
        st.session_state["outcomes_next"] = exp.name  # the picker is drawn: set it on the next run
        st.rerun(scope="app")


def experiment_problems(run_dir: Path, config: ExperimentConfig, train: TrainConfig, model: str | None) -> dict[str, str]:
    """What `threeds experiment` would refuse in these settings (label -> one line); empty when none."""
    found = {LABELS.get(key, key): message for key, message in {**problems(config), **problems(train)}.items()}
    try:
        parse_arms(config.arm, config.baseline)
        experiment_dir(run_dir, config.name)
    except SettingsError as exc:
        found["Arms and name"] = common.one_line_error(exc)
    if model is None:  # the embedded model: nothing to check
        return found
    problem = model_problem(model)
    if problem:
        found["Model"] = f"the run's model: {problem}"
    return found


outcomes_page()
