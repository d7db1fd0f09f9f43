"""Multi-token prediction (MTP) modules.

Depth k (1-based) predicts token t_{i+k+1} at position i from
    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])      (embedding first, as in the checkpoints)
    h^k_i = Block_k(h'_i)
    logits = Head(norm_k(h^k_i))
with the embedding and the output head shared with the main model. h^0 is the main model's final
(normalised) hidden state, the same tensor the engine hands to the draft at inference time.
In HF checkpoints module k is stored as layer num_hidden_layers + k - 1 (enorm, hnorm, eh_proj,
shared_head.norm and an ordinary decoder layer).

`mtp_forward` runs every depth over a training sequence; the model, the last pipeline stage and the
speculative draft all call the pieces here.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.block import Block
from dsv3.model.layers import RMSNorm
from dsv3.model.mla import LatentCache
from dsv3.model.moe import RouterStats


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(config, layer_id)
        self.norm = RMSNorm(D, config.rms_norm_eps)

    def combine(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h'_i = eh_proj([enorm(emb); hnorm(h)]): the block's input. h, emb [B, S, D]."""
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterStats | None]:
        """h [B, S, D] previous depth's hidden, emb [B, S, D] embeddings of the shifted tokens.

        Returns the block output h^k (pre-norm; `logits` applies norm and head) and router stats."""
        return self.block(self.combine(h, emb), cos, sin, cache, mask)

    def logits(self, h: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """Head(norm_k(h^k)) with the main model's head."""
        return head(self.norm(h))


def mtp_forward(
    mtp: nn.ModuleList,
    embed: nn.Module,
    head: nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[RouterStats]]:
    """Every MTP depth over a training sequence: hidden [B, T, D] = h^0, input_ids [B, T].

    Depth k reads t_{i+k} = input_ids rolled by k (the last k positions wrap: their targets are
    masked in the loss). Returns the logits of each depth [B, T, V] and the MoE blocks' router stats."""
    logits: list[torch.Tensor] = []
    stats: list[RouterStats] = []
    h = hidden
    for k, module in enumerate(mtp, start=1):
        shifted = torch.roll(input_ids, shifts=-k, dims=1)
        h, s = module(h, embed(shifted), cos, sin, None, mask)
        if s is not None:
            stats.append(s)
        logits.append(module.logits(h, head))
    return logits, stats
