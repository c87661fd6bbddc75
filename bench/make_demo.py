"""Make the demo run `cache/demo/` that the app opens with, using threeds itself.

    python bench/make_demo.py            # first 40 English sample records, embedded model, CPU

Takes the first `--records` lines of the bundled English sample data (MedQuAD) into
`cache/demo/input.jsonl`, runs `threeds run` on them with the embedded SmolLM2 model (Stage 1
rating, A' generation, Stage 2 scoring, selection of `--sample-num`), then computes the UMAP map
the app caches (`umap.npy`). A subset: the whole run takes about 2.5 minutes for these 40 records
on two CPU cores (Stage 1 and A' generation of up to 512 tokens most of it). Run it from the repository root;
run it again to resume an interrupted demo; delete cache/demo to redo it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threeds.cli import main as threeds  # noqa: E402
from threeds.rundir.read import load_run  # noqa: E402
from threeds.views.embed_map import load_or_compute_umap  # noqa: E402

SAMPLE = ROOT / "threeds" / "sample_data" / "medquad_en_200.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=40, help="first records of the sample data to use (default: 40)")
    parser.add_argument("--sample-num", type=int, default=10, help="k-center picks of the demo selection (default: 10)")
    parser.add_argument("--out", type=Path, default=Path("cache/demo"), help="run directory (default: cache/demo)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "input.jsonl"
    lines = SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[: args.records]
    if not data.exists() or data.read_text(encoding="utf-8") != "".join(lines):
        data.write_text("".join(lines), encoding="utf-8")
    rc = threeds(["run", "--data", str(data), "--out", str(args.out), "--sample-num", str(args.sample_num)])
    if rc != 0:
        return rc
    run = load_run(args.out)
    if run.errors:
        print(f"the run has unreadable files: {run.errors}", file=sys.stderr)
        return 1
    load_or_compute_umap(args.out, run.embeddings)
    print(f"demo run ready in {args.out}; open it with: streamlit run app.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
