"""Residual dropout, added by the trainer (the model code has none, as DeepSeek-V3 trains without it).

A 10M-parameter model on a 1 MB corpus sees each token ten times in a ten-minute run and starts to
memorise it; dropout on each sub-layer's output (before it is added to the residual stream, as in GPT-2's
resid_pdrop) is the usual cure. It is applied with forward hooks on every block's `attn` and `ffn`, only in
training mode, so evaluation, inference and exported checkpoints are untouched. Its random draws come from
torch's global generator, which checkpoints save and restore, so a resumed run stays bit-exact.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn


def add_residual_dropout(model: nn.Module, p: float) -> list[Any]:
    """Hook dropout(p) onto the outputs of every block's attention and FFN (MoE: its output tensor)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    if p == 0:
        return []

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        if not module.training:
            return out
        if isinstance(out, tuple):  # MoE: (y, router stats)
            return (F.dropout(out[0], p, True), *out[1:])
        return F.dropout(out, p, True)

    blocks = list(model.layers) + [m.block for m in getattr(model, "mtp", [])]
    return [sub.register_forward_hook(hook) for b in blocks for sub in (b.attn, b.ffn)]
