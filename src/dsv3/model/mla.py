"""Multi-head latent attention (MLA).

Query:  q = wq_b(q_norm(wq_a x))  (or q = wq x without q_lora_rank), per head [q_nope (Dn); q_pe (R)].
KV:     wkv_a x = [c_kv (C); k_pe (R)]; c = kv_norm(c_kv); k_pe is one head shared by all heads and
        carries RoPE. wkv_b c = per head [k_nope (Dn); v (Dv)].

Two ways to attend, same numbers:
- naive (training, prefill): expand c through wkv_b into per-head K and V and run SDPA;
- absorbed (decode): fold wkv_b's key half into the query and its value half into the output, so scores
  are q_nope W_uk . c + q_pe . k_pe and attention runs over the latent itself. The cache then holds only
  c (kv_lora_rank) and roped k_pe (qk_rope_head_dim) per token: 576 values for V3 instead of
  2 * 128 heads * 128 dims.

A cache is any object with `update(layer_id, c, pe) -> (c_all, pe_all)` returning the latent of all
positions of the rows in this batch, `mask` ([B, S, T] bool, True = may attend, or None for causal
over the new tokens alone) and `absorb` (use the absorbed path). The inference engine provides it.

The attention core of the naive path is `self.attention`, a function (q, k, v, mask, scale) -> o
(`sdpa_attention` here); a faster core for a device is set on the module from outside (`dsv3.cpu`), as
transformers selects `attn_implementation`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import RMSNorm
from dsv3.model.rope import apply_rope, softmax_scale

# (q [B, S, H, Dqk], k [B, T, H, Dqk], v [B, T, H, Dv], mask [B, S, T] bool or None = causal, scale)
#   -> o [B, S, H, Dv] in q's dtype
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with torch's fused kernel (the reference attention core)."""
    if mask is None and q.shape[1] != k.shape[1]:  # causal, new tokens last (is_causal aligns top-left)
        S, T = q.shape[1], k.shape[1]
        mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S).expand(q.shape[0], S, T)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # [B, H, S, D]
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None if mask is None else mask.unsqueeze(1),
        is_causal=mask is None,
        scale=scale,
    )
    return o.transpose(1, 2)


class LatentCache(Protocol):
    mask: torch.Tensor | None
    absorb: bool

    def update(
        self, layer_id: int, c: torch.Tensor, pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def score_bias(
    mask: torch.Tensor | None,
    B: int,
    S: int,
    H: int,
    T: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """The additive attention mask of `attend_absorbed`: 0 where mask [B, S, T] allows, -inf elsewhere,
    as [B, S*H, T] (a view with stride 0 over heads when S == 1). mask None = causal, new tokens last."""
    if mask is None:
        bias = torch.full((S, T), float("-inf"), dtype=dtype, device=device).triu(T - S + 1)
        bias = bias.view(1, S, 1, T)
    else:
        bias = torch.zeros(B, S, 1, T, dtype=dtype, device=device).masked_fill_(
            ~mask.unsqueeze(2), float("-inf")
        )
    return bias.expand(B, S, H, T).reshape(B, S * H, T)


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        c = config
        self.layer_id = layer_id
        self.n_heads = c.num_attention_heads
        self.q_lora_rank = c.q_lora_rank
        self.kv_lora_rank = c.kv_lora_rank
        self.qk_nope_head_dim = c.qk_nope_head_dim
        self.qk_rope_head_dim = c.qk_rope_head_dim
        self.qk_head_dim = c.qk_head_dim
        self.v_head_dim = c.v_head_dim
        self.rope_interleave = c.rope_interleave
        self.softmax_scale = softmax_scale(c)
        H, D = self.n_heads, c.hidden_size
        if c.q_lora_rank is None:
            self.wq = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(D, c.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.wq_b = nn.Linear(c.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(D, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.wkv_b = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.wo = nn.Linear(H * c.v_head_dim, D, bias=False)
        self.attention: AttentionFn = sdpa_attention

    def query(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, D] -> q_nope [B, S, H, Dn], roped q_pe [B, S, H, R]."""
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        return self.split_query(q, cos, sin)

    def split_query(
        self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, S, H*(Dn+R)] -> q_nope [B, S, H, Dn], roped q_pe [B, S, H, R]."""
        B, S, _ = q.shape
        # split_with_sizes: Tensor.split's Python wrapper costs ~2 us per call, which decode pays per layer
        q_nope, q_pe = q.view(B, S, self.n_heads, self.qk_head_dim).split_with_sizes(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1
        )
        return q_nope, apply_rope(q_pe, cos, sin, self.rope_interleave)

    def latent(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, D] -> c = kv_norm(c_kv) [B, S, C], roped k_pe [B, S, R]: what the cache stores."""
        return self.split_latent(self.wkv_a(x), cos, sin)

    def split_latent(
        self, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_a x [B, S, C+R] -> c = kv_norm(c_kv) [B, S, C], roped k_pe [B, S, R]."""
        c, pe = kv_a.split_with_sizes([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        pe = apply_rope(pe.unsqueeze(2), cos, sin, self.rope_interleave).squeeze(2)
        return self.kv_norm(c), pe

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mask [B, S, S] (True = may attend) for packed sequences without a cache; None = causal."""
        q_nope, q_pe = self.query(x, cos, sin)
        c, pe = self.latent(x, cos, sin)
        return self.wo(self.attend(q_nope, q_pe, c, pe, cache, mask))

    def attend(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c: torch.Tensor,
        pe: torch.Tensor,
        cache: LatentCache | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write the new latents to the cache (if any) and attend over all of it: [B, S, H*Dv]. Without a
        cache, `mask` (None = causal) says which positions attend to which."""
        if cache is None:
            return self.attend_naive(q_nope, q_pe, c, pe, mask)
        c, pe = cache.update(self.layer_id, c, pe)
        if not cache.absorb:
            return self.attend_naive(q_nope, q_pe, c, pe, cache.mask)
        return self.attend_absorbed(q_nope, q_pe, c, pe, cache.mask)

    def attend_naive(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c: torch.Tensor,
        pe: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Expand the latent to per-head K, V and run `self.attention`. mask None = causal. [B, S, H*Dv]."""
        B, S, H, _ = q_nope.shape
        T = c.shape[1]
        kv = self.wkv_b(c).view(B, T, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, pe.unsqueeze(2).expand(B, T, H, self.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = self.attention(q, k, v, mask, self.softmax_scale)  # [B, S, H, Dv]
        return o.reshape(B, S, H * self.v_head_dim)

    def attend_absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c: torch.Tensor,
        pe: torch.Tensor,
        mask: torch.Tensor | None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over the latent with wkv_b folded in. mask [B, S, T] (None = causal). [B, S, H*Dv].

        bias, when given, replaces mask: the additive mask (0 / -inf) in the scores' dtype, [B, S*H, T]
        or broadcastable to it (`score_bias`).
        Written as batched matmuls (no einsum) because decode runs it per token per layer on tiny shapes:
        the scale and the mask ride on the two score GEMMs (baddbmm with alpha) and the softmax is FP32."""
        B, S, H, Dn = q_nope.shape
        T, C = c.shape[1], self.kv_lora_rank
        w_uk, w_uv = self.absorbed_weights(q_nope.dtype)  # [H, Dn, C], [H, C, Dv]
        q_lat = torch.bmm(q_nope.reshape(B * S, H, Dn).transpose(0, 1), w_uk)  # [H, B*S, C]
        q_lat = q_lat.transpose(0, 1).reshape(B, S * H, C)
        if bias is None:
            bias = score_bias(mask, B, S, H, T, q_pe.dtype, c.device)
        # scores[b, (s,h), t] = scale * (q_pe . pe_t + q_lat . c_t) + bias
        scores = torch.baddbmm(
            bias, q_pe.reshape(B, S * H, self.qk_rope_head_dim), pe.transpose(1, 2), alpha=self.softmax_scale
        )
        scores = torch.baddbmm(scores, q_lat, c.transpose(1, 2), alpha=self.softmax_scale)
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(c.dtype)
        o_lat = torch.bmm(p, c)  # [B, S*H, C]
        o = torch.bmm(o_lat.view(B * S, H, C).transpose(0, 1), w_uv)  # [H, B*S, Dv]
        return o.transpose(0, 1).reshape(B, S, H * self.v_head_dim)

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_b split per head: w_uk [H, Dn, C] and w_uv transposed, [H, C, Dv], contiguous, in `dtype`.
        (FP8 conversion overrides it to fold the quantised weight, as its naive path multiplies by.)"""
        return self.split_wkv_b(self.wkv_b.weight, dtype)

    def split_wkv_b(self, w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        wkv_b = w.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
        w_uk, w_uv = wkv_b.to(dtype).split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        return w_uk.contiguous(), w_uv.transpose(1, 2).contiguous()
