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
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import PackedGEMV, RMSNorm, weights_key
from dsv3.model.rope import apply_rope, softmax_scale

# Largest B * heads * S * T for the CPU matmul attention (its BF16 scores and FP32 probabilities are
# materialised: ~6 bytes per element plus the backward's); longer sequences use the fused kernel.
_CPU_MATMUL_ATTN_MAX = 1 << 25


def _bf16_on_cpu(dtype: torch.dtype) -> bool:
    """Attention runs in BF16 on CPU when its inputs are BF16 or CPU autocast is on in BF16 (RoPE in
    FP32 leaves q and k FP32 under autocast; the projections around them are BF16 either way)."""
    if dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class LatentCache(Protocol):
    mask: torch.Tensor | None
    absorb: bool

    def update(
        self, layer_id: int, c: torch.Tensor, pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight of a Linear-like module (FP8 modules expose `dequantized_weight()`)."""
    if hasattr(layer, "dequantized_weight"):
        return layer.dequantized_weight()
    return layer.weight


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
        self._absorbed: tuple | None = None  # (key, w_uk, w_uv) cached by absorbed_weights at inference
        self.decode_gemv = False  # set by the inference engine: wq_a and wkv_a as one product at decode
        self._gemv_a = PackedGEMV(slabs=False)

    def query(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_a: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, D] -> q_nope [B, S, H, Dn], roped q_pe [B, S, H, R]. q_a: wq_a x, if already computed."""
        B, S, _ = x.shape
        if self.q_lora_rank is None:
            q = self.wq(x)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x) if q_a is None else q_a))
        # split_with_sizes: Tensor.split's Python wrapper costs ~2 us per call, which decode pays per layer
        q_nope, q_pe = q.view(B, S, self.n_heads, self.qk_head_dim).split_with_sizes(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1
        )
        return q_nope, apply_rope(q_pe, cos, sin, self.rope_interleave)

    def latent(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_a: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, D] -> c = kv_norm(c_kv) [B, S, C], roped k_pe [B, S, R]: what the cache stores.
        kv_a: wkv_a x, if already computed."""
        kv_a = self.wkv_a(x) if kv_a is None else kv_a
        c, pe = kv_a.split_with_sizes([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        pe = apply_rope(pe.unsqueeze(2), cos, sin, self.rope_interleave).squeeze(2)
        return self.kv_norm(c), pe

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None
    ) -> torch.Tensor:
        q_a = kv_a = None
        if self.decode_gemv and self.q_lora_rank is not None:  # both down-projections in one product
            a = self._gemv_a(x, self.wq_a, self.wkv_a)
            if a is not None:
                q_a, kv_a = a.split_with_sizes([self.q_lora_rank, a.shape[-1] - self.q_lora_rank], dim=-1)
        q_nope, q_pe = self.query(x, cos, sin, q_a)
        c, pe = self.latent(x, cos, sin, kv_a)
        if cache is None:
            return self.wo(self.attend_naive(q_nope, q_pe, c, pe, None))
        c, pe = cache.update(self.layer_id, c, pe)
        if not cache.absorb:
            return self.wo(self.attend_naive(q_nope, q_pe, c, pe, cache.mask))
        bias_of = getattr(cache, "score_bias", None)  # memoised per forward by the inference cache
        if bias_of is not None:
            return self.wo(self.attend_absorbed(q_nope, q_pe, c, pe, None, bias_of(self.n_heads, q_pe.dtype)))
        return self.wo(self.attend_absorbed(q_nope, q_pe, c, pe, cache.mask))

    def attend_naive(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c: torch.Tensor,
        pe: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Expand the latent to per-head K, V and run SDPA. mask None = causal. Returns [B, S, H*Dv]."""
        B, S, H, _ = q_nope.shape
        T = c.shape[1]
        kv = self.wkv_b(c).view(B, T, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, pe.unsqueeze(2).expand(B, T, H, self.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        if mask is None and S != T:  # causal with the new tokens last (SDPA's is_causal aligns top-left)
            mask = torch.ones(S, T, dtype=torch.bool, device=c.device).tril(T - S).expand(B, S, T)
        dtype, Dv = q.dtype, self.v_head_dim
        if q.device.type == "cpu" and B * H * S * T <= _CPU_MATMUL_ATTN_MAX and _bf16_on_cpu(dtype):
            bf16 = torch.bfloat16
            return self._attend_matmul(q.to(bf16), k.to(bf16), v.to(bf16), mask)  # BF16, as wo casts
        if q.device.type == "cpu":
            # CPU SDPA's fused (flash) kernel needs v as wide as q/k, else it falls back to an unfused path
            # whose BF16 version is slower still: attend in FP32 (the attention core in higher precision)
            # with v zero-padded to the q/k head size, and drop the padding from the output
            q, k, v = q.float(), k.float(), F.pad(v.float(), (0, max(q.shape[-1] - Dv, 0)))
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # [B, H, S, Dqk]
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=None if mask is None else mask.unsqueeze(1),
            is_causal=mask is None,
            scale=self.softmax_scale,
        )
        return o[..., :Dv].to(dtype).transpose(1, 2).reshape(B, S, H * Dv)

    def _attend_matmul(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """BF16 attention as two batched GEMMs with an FP32 softmax (CPU, short sequences).

        Scores come out of the GEMM rounded to BF16 (as transformers' eager attention under autocast);
        the softmax runs in FP32 and its probabilities go back to BF16 for the value GEMM, as in flash
        attention. On the 2-core CPU this is ~2x faster forward + backward than the fused CPU kernel at
        the tiny preset's shape (8 x 4 heads x 256^2), whose backward is slow at small head dims."""
        B, S, H, Dqk = q.shape
        T, Dv = k.shape[1], v.shape[-1]
        qh = q.transpose(1, 2).reshape(B * H, S, Dqk)
        kh = k.transpose(1, 2).reshape(B * H, T, Dqk)
        vh = v.transpose(1, 2).reshape(B * H, T, Dv)
        if mask is None:  # causal: an additive -inf bias above the diagonal, broadcast over B*H
            bias = torch.full((S, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            scores = torch.baddbmm(bias, qh, kh.transpose(1, 2), alpha=self.softmax_scale)
        else:
            scores = torch.bmm(qh, kh.transpose(1, 2)).mul_(self.softmax_scale).view(B, H, S, T)
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf")).view(B * H, S, T)
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.bmm(p, vh)  # [B*H, S, Dv]
        return o.view(B, H, S, Dv).transpose(1, 2).reshape(B, S, H * Dv)

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
        or broadcastable to it (`score_bias`; the inference cache builds it once per forward).
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
        """wkv_b split per head into w_uk [H, Dn, C] and w_uv transposed, [H, C, Dv], contiguous, in `dtype`.

        Without autograd (inference) the pair is kept until wkv_b's weight changes (its storage or version
        counter), so decode does not re-derive it per token, nor re-dequantise an FP8 wkv_b."""
        w = self.wkv_b.weight
        key = None
        if not torch.is_grad_enabled() and not w.is_inference():
            key = (weights_key(w), dtype)
            if self._absorbed is not None and self._absorbed[0] == key:
                return self._absorbed[1], self._absorbed[2]
        wkv_b = linear_weight(self.wkv_b).view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
        w_uk, w_uv = wkv_b.to(dtype).split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        w_uk, w_uv = w_uk.contiguous(), w_uv.transpose(1, 2).contiguous()
        self._absorbed = None if key is None else (key, w_uk, w_uv)
        return w_uk, w_uv
