"""Multi-token prediction (MTP) modules.

Depth k (1-based) predicts token t_{i+k+1} at position i from
    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])      (embedding first, as in the checkpoints)
    h^k_i = Block_k(h'_i)
    logits = Head(norm_k(h^k_i))
with the embedding and the output head shared with the main model. h^0 is the main model's final
(normalised) hidden state, the same tensor the engine hands to the draft at inference time.
In HF checkpoints module k is stored as layer num_hidden_layers + k - 1 (enorm, hnorm, eh_proj,
shared_head.norm and an ordinary decoder layer).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import RMSNorm
from dsv3.model.mla import LatentCache
from dsv3.model.moe import RouterStats


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        from dsv3.model.transformer import Block  # Block lives with the model; no import cycle at load

        super().__init__()
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(config, layer_id)
        self.norm = RMSNorm(D, config.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
    ) -> tuple[torch.Tensor, RouterStats | None]:
        """h [B, S, D] previous depth's hidden, emb [B, S, D] embeddings of the shifted tokens.

        Returns the block output h^k (pre-norm; apply `self.norm` before the head) and router stats."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, cos, sin, cache)
