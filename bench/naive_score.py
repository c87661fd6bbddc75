"""The naive Stage-2 computation, as the original 3DS release does it: one sample at a time,
three forward passes (prompt, prompt + A, prompt + A'; the prompt tokenised on its own), eager attention with every layer's
attention maps returned. Used as the speed baseline and, in the tests, as an independent
reference for the numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from threeds.io.data import full_instruction
from threeds.model.function_words import FunctionWords
from threeds.model.prompts import PromptFormat


def _token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """ce[t] = CE(logits[t-1], ids[t]) for t >= 1; ce[0] = 0."""
    ce = F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")
    return torch.cat([ce.new_zeros(1), ce])


@torch.inference_mode()
def naive_sample(model, tokenizer, fmt: PromptFormat, fw: FunctionWords, record: dict, max_length: int = 1024) -> dict:
    """All Stage-2 numbers of one record, straight from the spec's definitions."""
    prompt = fmt.prompt(full_instruction(record))
    eot = fmt.end_of_turn
    p_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_length]
    out = model(input_ids=p_ids.to(model.device), output_hidden_states=True)
    ce = _token_ce(out.logits[0], p_ids[0].to(model.device))
    row = {
        "id": record["id"],
        "ins_ppl": math.exp(ce[1:].double().mean().item()) if p_ids.shape[1] > 1 else math.nan,
        "embedding": out.hidden_states[-1][0].float().mean(0).cpu().numpy(),
    }
    for name, field in (("gt", "output"), ("gen", "generated_output")):
        tail = tokenizer(record[field] + eot, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.cat([p_ids[0], torch.tensor(tail["input_ids"], dtype=torch.long)])[:max_length]
        out = model(input_ids=ids[None].to(model.device), output_attentions=True)
        att = out.attentions[-1][0].float()  # [heads, L, L]
        length = ids.shape[0]
        w_mean = (att.sum(dim=1).mean(dim=0) / (length - torch.arange(length, device=att.device))).cpu().numpy()
        w_max = att.amax(dim=1).mean(dim=0).cpu().numpy()
        ce = _token_ce(out.logits[0], ids.to(model.device)).cpu().numpy()
        resp = list(range(p_ids.shape[1], length))  # the tokens of R + E within max_length
        spans = [tuple(span) for span in tail["offset_mapping"][: len(resp)]]
        keep = ~np.asarray(fw.flags([record[field]], [spans])[0], dtype=bool)
        idx = np.asarray(resp, dtype=int)[keep]
        for method, w in (("mean", w_mean), ("max", w_max)):
            ws = w[idx].astype(np.float64)
            row[f"{name}_wloss_{method}"] = float((ce[idx] * ws).sum() / ws.sum()) if ws.size else math.nan
        row[f"{name}_tokens"] = len(resp)
    return row
