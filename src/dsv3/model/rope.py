"""Rotary position embedding with YaRN, in both layouts HF configs use.

YaRN (as DeepSeek and transformers compute it): frequencies below the `beta_slow` rotation count are
interpolated by `factor`, those above `beta_fast` are kept, with a linear ramp in between over the
(floored/ceiled) correction range computed at `original_max_position_embeddings`. Two scale factors:
- cos/sin are multiplied by get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim), which is 1
  when the two are equal (V3: 1.0/1.0, V2: 0.707/0.707);
- the softmax scale is qk_head_dim^-0.5 * get_mscale(factor, mscale_all_dim)^2.

Layouts: `rope_interleave=True` (DeepSeek's checkpoints) rotates adjacent pairs (x0, x1), (x2, x3)...
as complex numbers; False rotates (x_i, x_{i+R/2}) pairs (rotate_half). Either gives the same scores.
"""

from __future__ import annotations

import math

import torch

from dsv3.config import ModelConfig


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] (float32) and the cos/sin scale (attention factor)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if config.rope_type != "yarn":
        return inv_freq, 1.0
    rs = config.rope_scaling or {}
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attn_factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attn_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        attn_factor = yarn_get_mscale(factor)

    def correction_dim(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1 keeps the original frequency
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, attn_factor


def softmax_scale(config: ModelConfig) -> float:
    scale = config.qk_head_dim**-0.5
    if config.rope_type == "yarn":
        rs = config.rope_scaling or {}
        if rs.get("mscale_all_dim"):
            m = yarn_get_mscale(float(rs["factor"]), rs["mscale_all_dim"])
            scale *= m * m
    return scale


def rope_cos_sin(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attn_factor: float,
    dtype: torch.dtype,
    interleave: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, S] -> cos, sin [B, S, 1, R] in `dtype`, laid out for `apply_rope` in `interleave`'s
    layout: cos repeated onto both members of each rotated pair, sin negated on the first member."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    cos, sin = freqs.cos() * attn_factor, freqs.sin() * attn_factor
    if interleave:
        cos, sin = cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)
    else:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return cos.to(dtype).unsqueeze(-2), sin.to(dtype).unsqueeze(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [B, S, H, R]; cos/sin [B, S, 1, R] from `rope_cos_sin` -> rotated x, same layout.

    Each pair (a, b) becomes (a cos - b sin, b cos + a sin), computed as x * cos + partner(x) * sin with
    partner(x) = (b, a) and sin pre-negated on a: the same products and sums, so the same bits, in three
    kernels instead of seven."""
    if interleave:
        partner = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        partner = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return x * cos + partner * sin
