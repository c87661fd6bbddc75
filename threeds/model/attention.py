"""Last-layer attention capture for 3DS token weights, with fused attention everywhere else.

3DS needs the softmax probabilities of the LAST decoder layer only. Asking transformers for
`output_attentions` forces eager attention in every layer and keeps L x L maps for all of them.
Instead one attention function is registered with transformers' `AttentionInterface`: every layer
but the last calls SDPA as usual; the last builds its causal + padding mask itself from the batch's
2-D attention mask (SDPA layers may get no mask at all, only a causal flag), computes the
probabilities, reduces them to per-key weights at once and discards them.

Per-key weights (spec, Stage 2 item 4), over the L real tokens of a sequence:
  mean: w_k = mean_h( sum_q att[h,q,k] ) / (L - k)
  max:  w_k = mean_h( max_q att[h,q,k] )
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "threeds"
# Largest number of [B, h, L, L] float32 score elements held at once (512 MiB).
MAX_SCORE_ELEMENTS = 1 << 27


@dataclass
class LastLayerCapture:
    """The batch's padding mask going in, the per-key weights ([B, L], float32) coming out."""

    padding_mask: torch.Tensor
    layer_idx: int
    w_mean: torch.Tensor | None = None
    w_max: torch.Tensor | None = None


_CAPTURE: contextvars.ContextVar[LastLayerCapture | None] = contextvars.ContextVar("threeds_capture", default=None)


@contextlib.contextmanager
def capture_last_layer(model: PreTrainedModel, padding_mask: torch.Tensor) -> Iterator[LastLayerCapture]:
    """Within this block, a forward pass of `model` fills the returned capture's weights."""
    layers = model.config.get_text_config().num_hidden_layers
    capture = LastLayerCapture(padding_mask=padding_mask.bool(), layer_idx=layers - 1)
    token = _CAPTURE.set(capture)
    try:
        yield capture
    finally:
        _CAPTURE.reset(token)


def head_sums(probs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key, summed over heads: (sum over query rows, max over query rows) of probs [B, H, L, L].

    Padded query rows are zeroed first: probabilities are >= 0, so that changes neither the sums nor
    the maxima over real rows.
    """
    masked = probs * valid[:, None, :, None].to(probs.dtype)
    return masked.sum(dim=2).sum(dim=1), masked.amax(dim=2).sum(dim=1)


def normalise_mean(col_sums: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Divide by L - k, the number of real query rows that can see key k."""
    lengths = valid.sum(dim=1, keepdim=True)
    positions = torch.arange(valid.shape[1], device=valid.device)[None, :]
    return col_sums / (lengths - positions).clamp(min=1)


def _allowed(valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] boolean: causal, real keys only; the diagonal stays open so no row is empty."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def _last_layer(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    capture: LastLayerCapture,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    batch, heads, length, dim = query.shape
    key = repeat_kv(key, heads // key.shape[1])
    value = repeat_kv(value, heads // value.shape[1])
    valid = capture.padding_mask.to(query.device)
    allowed = _allowed(valid)
    scale = scaling if scaling is not None else dim**-0.5
    step = max(1, MAX_SCORE_ELEMENTS // max(1, batch * length * length))
    outputs, sums, maxes = [], torch.zeros(batch, length, device=query.device), torch.zeros(batch, length, device=query.device)
    for h in range(0, heads, step):
        scores = torch.matmul(query[:, h : h + step].float(), key[:, h : h + step].float().transpose(2, 3)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        outputs.append(torch.matmul(probs.to(value.dtype), value[:, h : h + step]))
        col_sum, col_max = head_sums(probs, valid)
        sums += col_sum
        maxes += col_max
    capture.w_mean = normalise_mean(sums / heads, valid)
    capture.w_max = maxes / heads
    return torch.cat(outputs, dim=1).transpose(1, 2).contiguous()


def threeds_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA in every layer; in the last one, also the per-key weights (when a capture is active)."""
    capture = _CAPTURE.get()
    if capture is None or getattr(module, "layer_idx", None) != capture.layer_idx:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("sliding_window"):
        raise NotImplementedError("threeds: a sliding-window last layer is not supported")
    return _last_layer(module, query, key, value, capture, scaling, kwargs.get("softcap")), None


def use_threeds_attention(model: PreTrainedModel) -> PreTrainedModel:
    """Switch `model` to the capturing attention (SDPA masks for the fused layers)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, threeds_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
