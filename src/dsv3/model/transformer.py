"""The DeepSeek-V3 model: blocks, the transformer with MTP, and the training loss.

`Transformer(config)(input_ids)` returns a `ModelOutput` with `.logits` [B, T, V], `.mtp_logits`
(one [B, T, V] per MTP depth; the last k positions of depth k have no target), `.hidden` (final
normalised hidden state) and the router statistics of every MoE layer (main layers first, then MTP).

`lm_loss(out, labels, ...)` = main CE + mtp_weight * mean_k(MTP CE_k) + alpha * sum_layers(balance),
with every part reported separately. `labels[:, i]` is the token after `input_ids[:, i]` (-100 ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.block import Block, run_blocks
from dsv3.model.layers import RMSNorm
from dsv3.model.loss import cross_entropy
from dsv3.model.mla import LatentCache
from dsv3.model.moe import MoE, RouterStats
from dsv3.model.mtp import MTPModule, mtp_forward
from dsv3.model.rope import rope_cos_sin, rope_inv_freq

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor
    hidden: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    router_stats: list[RouterStats] = field(default_factory=list)


@dataclass
class LossOutput:
    loss: torch.Tensor  # what backward() is called on
    main_loss: torch.Tensor
    mtp_loss: torch.Tensor
    balance_loss: torch.Tensor


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        L = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(config, L + k) for k in range(config.num_nextn_predict_layers))
        inv_freq, self.rope_attn_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.init_weights()

    # ----------------------------------------------------------------- setup
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zero balance biases."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("norm.weight") or p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        if self.config.tie_word_embeddings:
            self.head.weight = self.embed.weight
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias") and not b.is_meta:
                b.zero_()
        if not self.inv_freq.is_meta:
            self.inv_freq.copy_(rope_inv_freq(self.config)[0])

    def moe_layers(self) -> list[MoE]:
        """Every MoE module in forward order (main layers, then MTP blocks): router_stats align with it."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, 1, R] for positions [B, S] (`rope_cos_sin`)."""
        cfg = self.config
        return rope_cos_sin(positions, self.inv_freq, self.rope_attn_factor, dtype, cfg.rope_interleave)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        with_mtp: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        segment_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T] -> ModelOutput. positions [B, T] default 0..T-1. MTP runs without a cache.

        logits_to_keep (as in transformers): 0 = logits at every position; N > 0 = the last N positions;
        a 1-D index tensor = those positions (`.logits` is then [B, len, V]; `.hidden` stays whole).
        Prefill needs the last prompt position only, and the head over every position is ~10% of it.
        segment_ids [B, T]: packed samples (`sample_mask`), with positions restarting in each sample."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        mask = None if segment_ids is None else sample_mask(segment_ids)
        x, stats = run_blocks(self.layers, x, cos, sin, cache, mask)
        hidden = self.norm(x)
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            kept = hidden[:, logits_to_keep]
        out = ModelOutput(logits=self.head(kept), hidden=hidden, router_stats=stats)
        if with_mtp if with_mtp is not None else (cache is None and len(self.mtp) > 0):
            out.mtp_logits, mtp_stats = mtp_forward(
                self.mtp, self.embed, self.head, hidden, input_ids, cos, sin, mask
            )
            stats.extend(mtp_stats)
        return out

    def num_params(self, exclude_mtp: bool = True) -> int:
        skip = {id(p) for p in self.mtp.parameters()} if exclude_mtp else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)


def sample_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Sample masking for packed sequences: segment_ids [B, T] (one id per sample) -> [B, T, T] bool,
    position i attends to j <= i of its own sample only (block-diagonal causal)."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal


def lm_loss(
    out: ModelOutput,
    labels: torch.Tensor,
    mtp_weight: float = 0.3,
    balance_alpha: float = 0.0,
    balance: str = "seq",
) -> LossOutput:
    """Main CE + mtp_weight * mean over depths of MTP CE + balance_alpha * sum over MoE layers.

    balance: "seq" (DeepSeek-V3's complementary sequence-wise loss), "aux" (classic batch-wise
    auxiliary loss, for ablations) or "none"."""
    V = out.logits.shape[-1]
    main = cross_entropy(out.logits.reshape(-1, V), labels.reshape(-1), IGNORE_INDEX)
    zero = main.new_zeros(())
    mtp = zero
    if out.mtp_logits:
        parts = []
        for k, logits in enumerate(out.mtp_logits, start=1):
            target = torch.roll(labels, shifts=-k, dims=1).clone()
            target[:, -k:] = IGNORE_INDEX
            parts.append(cross_entropy(logits.reshape(-1, V), target.reshape(-1), IGNORE_INDEX))
        mtp = torch.stack(parts).mean()
    bal = zero
    if balance != "none" and out.router_stats:
        seq = balance == "seq"
        bal = torch.stack([s.seq_balance_loss if seq else s.aux_loss for s in out.router_stats]).sum()
    loss = main + mtp_weight * mtp + balance_alpha * bal
    return LossOutput(loss=loss, main_loss=main.detach(), mtp_loss=mtp.detach(), balance_loss=bal.detach())
