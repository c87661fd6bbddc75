"""The letters prompts of `threeds eval` against lm-evaluation-harness's own, string for string
(BENCHMARKS.md (p), issue 31 items 4 and 6).

Every MMLU-medical test item, 0-shot and K-shot: threeds renders its `letters` prompt and the
continuations " A" to " D" (`threeds.outcomes.evaluate.render`, shots from the dev split); the
harness builds its requests (`ConfigurableTask.build_all_requests`) from its installed MMLU task
files (`tasks/mmlu/default/_default_template_yaml` and `mmlu_<subject>.yaml`: the description line,
the template, `first_n` shots from the dev split), pointed at the same CSV rows (given to it as JSON
lines, unchanged) instead of the Hub copy. Prints how many (context, continuation) pairs are equal
and the first difference. No model runs: it takes seconds.

    .venv/bin/python bench/lmeval_prompts.py --lmeval-python /work/lmeval-venv/bin/python --shots 0 5
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def harness(folder: Path, shots: int, out: Path) -> None:
    """lm-eval's (context, continuation) pairs per subject from its own MMLU task files; writes out."""
    import lm_eval
    import yaml
    from lm_eval.api.task import ConfigurableTask

    tasks = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    template = yaml.safe_load((tasks / "_default_template_yaml").read_text())
    found = {}
    for subject in sorted(p.stem.removesuffix("_test") for p in folder.glob("*_test.jsonl")):
        own = yaml.safe_load((tasks / f"mmlu_{subject}.yaml").read_text())
        config = {**template, **{k: v for k, v in own.items() if k not in ("include", "tag", "dataset_name")},
                  "dataset_path": "json", "num_fewshot": shots,
                  "dataset_kwargs": {"data_files": {s: str(folder / f"{subject}_{s}.jsonl") for s in ("test", "dev")}}}  # fmt: skip
        task = ConfigurableTask(config=config)
        task.build_all_requests()
        found[subject] = [list(i.args) for i in sorted(task.instances, key=lambda i: (i.doc_id, i.idx))]
    out.write_text(json.dumps({"lm_eval": lm_eval.__version__, "pairs": found}))


def harness_docs(folder: Path) -> None:
    """MMLU-medical's CSV rows as the Hub's MMLU rows (question, subject, choices, answer index), unchanged."""
    root = _data_root() / "mmlu_medical"
    for split in ("test", "dev"):
        for path in sorted((root / split).glob(f"*_{split}.csv")):
            subject = path.stem.removesuffix(f"_{split}")
            rows = [{"question": r[0], "subject": subject, "choices": r[1:-1], "answer": "ABCDEFGHIJ".index(r[-1].strip())}
                    for r in csv.reader(path.open(newline="", encoding="utf-8"))]  # fmt: skip
            (folder / f"{subject}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _data_root() -> Path:
    sys.path.insert(0, str(ROOT))
    from threeds.outcomes.benchsets import eval_data_dir

    return eval_data_dir()


def threeds_pairs(shots: int) -> dict[str, list[list[str]]]:
    """threeds' letters (context, continuation) pairs per subject, in file order."""
    sys.path.insert(0, str(ROOT))
    from threeds.outcomes.benchsets import load_bench
    from threeds.outcomes.evaluate import render, shots_for

    bench = load_bench("mmlu-medical")
    found: dict[str, list[list[str]]] = {}
    for item in bench.items:
        prompt, continuations = render(item, "letters", shots_for(item, bench.dev, shots), None)
        found.setdefault(item.subject, []).extend([prompt, c] for c in continuations)
    return found


def compare(ours: dict, theirs: dict) -> tuple[int, int, list[str]]:
    """(pairs equal, pairs compared, a description of the first few differences)."""
    equal = total = 0
    differences = []
    for subject, pairs in ours.items():
        other = theirs.get(subject, [])
        if len(other) != len(pairs):
            differences.append(f"{subject}: {len(pairs)} pairs in threeds, {len(other)} in the harness")
        for k, (a, b) in enumerate(zip(pairs, other)):
            total += 1
            equal += a == b
            if a != b and len(differences) < 5:
                at = next((i for i, (x, y) in enumerate(zip(a[0], b[0])) if x != y), min(len(a[0]), len(b[0])))
                differences.append(f"{subject} pair {k}: context differs at char {at}: threeds {a[0][at - 30:at + 30]!r}, "
                                   f"harness {b[0][at - 30:at + 30]!r}" if a[0] != b[0] else f"{subject} pair {k}: {a[1]!r} vs {b[1]!r}")  # fmt: skip
    return equal, total, differences


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "harness":
        harness(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lmeval-python", required=True, help="the Python of an environment with lm-eval installed")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    args = parser.parse_args()
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        harness_docs(folder)
        for shots in args.shots:
            subprocess.run([args.lmeval_python, __file__, "harness", str(folder), str(shots), str(folder / "harness.json")],
                           check=True, capture_output=True)  # fmt: skip
            theirs = json.loads((folder / "harness.json").read_text())
            equal, total, differences = compare(threeds_pairs(shots), theirs["pairs"])
            print(f"{shots}-shot letters, lm-eval {theirs['lm_eval']}: {equal} of {total} (context, continuation) pairs identical")
            for line in differences:
                print("  " + line)
            same &= equal == total and not differences
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
