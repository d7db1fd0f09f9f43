"""The decoder layer: pre-norm MLA and a feed-forward (dense SwiGLU, or DeepSeekMoE past the dense layers)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.mla import MLA, LatentCache
from dsv3.model.moe import MoE, RouterStats


class Block(nn.Module):
    """x + MLA(attn_norm x), then x + FFN(ffn_norm x); FFN = MoE past the first_k_dense_replace layers."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MLA(config, layer_id)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn: nn.Module = (
            MoE(config)
            if config.is_moe_layer(layer_id)
            else MLP(config.hidden_size, config.intermediate_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterStats | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
        if isinstance(self.ffn, MoE):
            y, stats = self.ffn(self.ffn_norm(x))
            return x + y, stats
        return x + self.ffn(self.ffn_norm(x)), None


def run_blocks(
    blocks: Iterable[Block],
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: LatentCache | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[RouterStats]]:
    """x through the blocks in order; the router statistics of the MoE ones, in order. The transformer
    runs all its layers with it, a pipeline stage its own."""
    stats: list[RouterStats] = []
    for block in blocks:
        x, s = block(x, cos, sin, cache, mask)
        if s is not None:
            stats.append(s)
    return x, stats
