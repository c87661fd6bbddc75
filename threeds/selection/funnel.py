"""How many samples each stage of a run saw and kept: the funnel the Runs page shows."""

from __future__ import annotations

from threeds.rundir.check import stage_part
from threeds.rundir.read import Run, run_settings, selected_ids
from threeds.selection.quality import quality_mask


def stage_counts(run: Run) -> dict[str, int | None]:
    """How many samples each stage saw and kept (None where the stage has not run)."""
    settings = run_settings(run)
    rated = kept = None
    if run.ratings is not None:
        scores = run.ratings["score"]
        rated = int(scores.notna().sum())
        if "quality_threshold" in settings:
            kept = int(quality_mask(scores, settings["quality_threshold"]).sum())
    generated = stage_part(run.manifest, "generate", "summary").get("done")
    in_bands = ((run.selection or {}).get("report") or {}).get("n_kept")
    return {
        "input records": _first_int(stage_part(run.manifest, "rate", "data").get("n_records"), (run.manifest.get("data") or {}).get("n_records")),
        "rejected": run.rejects,
        "rated (Stage 1)": rated,
        "kept by quality": kept,
        "A' generated": _first_int(generated),
        "scored (Stage 2)": None if run.metrics is None else len(run.metrics),
        "in all bands": _first_int(in_bands),
        "selected": None if run.selection is None else len(selected_ids(run.selection)),
    }


def _first_int(*values) -> int | None:
    return next((int(v) for v in values if isinstance(v, (int, float))), None)
