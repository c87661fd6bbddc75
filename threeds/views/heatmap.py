"""What the inspector's token heatmaps show, computed from one response's rows of tokens.parquet.

Stage 2's weighted loss (spec item 6) is `sum_i loss_i * w_i / sum_i w_i` over the kept tokens
(function words dropped). Written per token it is `share_i * loss_i` with `share_i = w_i / sum w`:
the *contribution* of token i, and the contributions sum to the metric in metrics.parquet. The
attention weight is shown as that share too, so the three views (share, loss, contribution) are
the three factors of the number the bands filter on.

The colour scale must not be set by an attention sink: with mean attention the end-of-turn
marker often carries a fifth of the weight and every other token looks white next to it. The
scale's top is a high percentile of the other kept tokens; cells above it are drawn at full
colour and flagged as clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

VIEWS = {  # view -> (column of `token_view`, what it is)
    "contribution": ("contribution", "weight share x loss: the token's part of the weighted loss"),
    "attention weight": ("share", "the token's share of the attention weight of the kept tokens"),
    "loss": ("loss", "next-token cross-entropy of the token"),
}
SCALE_PERCENTILE = 95.0


def token_view(tokens: pd.DataFrame, weight: str, text_length: int) -> pd.DataFrame:
    """`tokens` (one response's rows, in order) with `share`, `contribution` and `marker` added.

    `weight` is `w_mean` or `w_max`; `text_length` is the response text's length in characters:
    tokens starting at or past it belong to the end-of-turn marker (`marker` True). Function
    words get share and contribution 0: the weighted loss drops them.
    """
    view = tokens.reset_index(drop=True).copy()
    kept = ~view["function_word"].to_numpy(dtype=bool)
    w = np.where(kept, view[weight].to_numpy(dtype=np.float64), 0.0)
    total = w.sum()
    view["share"] = w / total if total > 0 else np.zeros_like(w)
    view["contribution"] = view["share"] * view["loss"].to_numpy(dtype=np.float64)
    view["marker"] = view["start"].to_numpy() >= text_length
    return view


def weighted_loss(view: pd.DataFrame) -> float:
    """The response's weighted loss as the sum of its tokens' contributions (NaN when no kept
    token has weight, as in metrics.parquet)."""
    if not (view["share"] > 0).any():
        return float("nan")
    return float(view["contribution"].sum())


def marker_part(view: pd.DataFrame) -> tuple[float, float]:
    """(share of the weight, fraction of the weighted loss) carried by the end-of-turn marker."""
    marker = view["marker"].to_numpy(dtype=bool)
    total = view["contribution"].sum()
    share = float(view["share"].to_numpy()[marker].sum())
    return share, float(view["contribution"].to_numpy()[marker].sum() / total) if total > 0 else 0.0


@dataclass(frozen=True)
class Scale:
    """A colour scale from 0 to `top`: per token the fill in [0, 1] and whether it was clipped."""

    top: float
    fill: np.ndarray  # float, 0..1
    clipped: np.ndarray  # bool: value above `top`, drawn at full colour


def robust_scale(values: np.ndarray, counted: np.ndarray, percentile: float = SCALE_PERCENTILE) -> Scale:
    """Scale `values` (all >= 0) so that the `percentile`-th of the `counted` ones is full colour.

    `counted` leaves out what must not set the scale (function words, the end-of-turn marker).
    A single dominant token among the counted ones lies above a high percentile and is clipped
    too. Falls back to the largest value when nothing is counted or the percentile is 0.
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    counted = np.asarray(counted, dtype=bool)
    top = float(np.percentile(values[counted], percentile)) if counted.any() else 0.0
    if top <= 0:
        top = float(values.max()) if values.size and values.max() > 0 else 1.0
    return Scale(top=top, fill=np.clip(values / top, 0.0, 1.0), clipped=values > top)


def view_scale(view: pd.DataFrame, column: str, percentile: float = SCALE_PERCENTILE) -> Scale:
    """`robust_scale` of a `token_view` column, set by the kept tokens other than the marker;
    function words (drawn grey, not on the scale) are never flagged as clipped."""
    kept = ~view["function_word"].to_numpy(dtype=bool)
    scale = robust_scale(view[column].to_numpy(), kept & ~view["marker"].to_numpy(dtype=bool), percentile)
    return Scale(top=scale.top, fill=scale.fill, clipped=scale.clipped & kept)
