"""Auxiliary-loss-free load balancing and the load metrics.

Each MoE router holds a per-expert bias b (`e_score_correction_bias`) that is added to the affinities
only to choose experts. It is not trained by gradient: the gradient of the LM loss says nothing about
load, and a gradient-trained bias would be pulled to whatever lowers the loss. Instead, after every
optimizer step, each expert's bias moves by a fixed gamma against the sign of its load's deviation:

    b_i += gamma * sign(mean_j load_j - load_i)

so an overloaded expert becomes a little less likely to be chosen and an underloaded one more, at a
rate independent of the loss scale. The load is counted over the whole global batch of the step (a
data-parallel trainer sums counts over ranks first so every replica moves its bias the same way).

MaxVio (the paper's balance metric) = max_i load_i / mean_i load_i - 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv3.model.moe import MoE


@torch.no_grad()
def update_balance_bias(moe_layers: Sequence[MoE], counts: Sequence[torch.Tensor], gamma: float) -> None:
    """Move every MoE layer's e_score_correction_bias by gamma * sign(mean load - load)."""
    if len(moe_layers) != len(counts):
        raise ValueError(f"{len(moe_layers)} MoE layers but {len(counts)} load vectors")
    if gamma == 0:
        return
    for moe, load in zip(moe_layers, counts):
        bias = moe.gate.e_score_correction_bias
        if bias is None:
            continue  # routers without a bias (greedy / softmax) are balanced by loss only
        load = load.to(device=bias.device, dtype=torch.float32)
        bias.add_(torch.sign(load.mean() - load), alpha=gamma)


def max_violation(load: torch.Tensor) -> float:
    """max load / mean load - 1 for one layer's per-expert token counts (0 = perfectly balanced)."""
    mean = load.float().mean()
    if mean <= 0:
        return 0.0
    return float(load.float().max() / mean - 1)


def balance_biases(moe_layers: Sequence[MoE]) -> list[torch.Tensor | None]:
    """Copies of each layer's bias (for logs and checkpoints)."""
    out = []
    for moe in moe_layers:
        b = moe.gate.e_score_correction_bias
        out.append(None if b is None else b.detach().clone())
    return out
