"""The attention core of MLA's naive path (training, prefill) for CPUs.

Same formula as `dsv3.model.mla.sdpa_attention`, laid out for what runs fast on a CPU:
- short sequences in BF16 (BF16 inputs, or BF16 CPU autocast): two batched GEMMs with an FP32 softmax.
  Scores come out of the GEMM rounded to BF16 (as transformers' eager attention under autocast); the
  softmax runs in FP32 and its probabilities go back to BF16 for the value GEMM, as in flash attention.
  On a 2-core CPU this is ~2x faster forward + backward than the fused CPU kernel at the tiny preset's
  shape (8 x 4 heads x 256^2), whose backward is slow at small head dims. The backward recomputes the
  probabilities from the saved BF16 scores (one softmax) instead of keeping them in FP32 and BF16:
  3x less activation memory for attention (~100 MB of a tiny-preset step), the same numbers;
- otherwise FP32 SDPA with v zero-padded to q's head size: CPU SDPA's fused (flash) kernel needs v as
  wide as q/k, else it falls back to an unfused path (whose BF16 version is slower still).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.mla import sdpa_attention

# Largest B * heads * S * T for the matmul attention (its BF16 scores and FP32 probabilities are
# materialised: ~6 bytes per element plus the backward's); longer sequences use the fused kernel.
MATMUL_ATTN_MAX = 1 << 25


def _bf16(dtype: torch.dtype) -> bool:
    """BF16 inputs, or CPU autocast in BF16 (RoPE in FP32 leaves q and k FP32 under autocast; the
    projections around them are BF16 either way)."""
    if dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def cpu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """`sdpa_attention`'s contract: q, k [B, S|T, H, Dqk], v [B, T, H, Dv] -> [B, S, H, Dv] in q's dtype."""
    B, S, H, Dqk = q.shape
    T, Dv = k.shape[1], v.shape[-1]
    if B * H * S * T <= MATMUL_ATTN_MAX and _bf16(q.dtype):
        bf16 = torch.bfloat16
        return matmul_attention(q.to(bf16), k.to(bf16), v.to(bf16), mask, scale)  # BF16, as wo casts
    o = sdpa_attention(q.float(), k.float(), F.pad(v.float(), (0, max(Dqk - Dv, 0))), mask, scale)
    return o[..., :Dv].to(q.dtype)


class _MatmulAttention(torch.autograd.Function):
    """o = bf16(softmax_fp32(scores)) @ v with scores = scale * q k^T + bias ([BH, S, T] BF16 GEMMs);
    saves q, k, v and the scores, and recomputes the probabilities in the backward."""

    @staticmethod
    def forward(ctx, qh, kh, vh, bias, scale):  # type: ignore[override]
        scores = torch.baddbmm(bias, qh, kh.transpose(1, 2), alpha=scale)
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qh.dtype)
        ctx.save_for_backward(qh, kh, vh, scores)
        ctx.scale = scale
        return torch.bmm(p, vh)

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        qh, kh, vh, scores = ctx.saved_tensors
        p = torch.softmax(scores, dim=-1, dtype=torch.float32)
        dp = torch.bmm(do, vh.transpose(1, 2)).float()
        dv = torch.bmm(p.to(qh.dtype).transpose(1, 2), do)
        ds = (p * (dp - (dp * p).sum(-1, keepdim=True))).to(qh.dtype)  # softmax backward in FP32
        dq = torch.bmm(ds, kh).mul_(ctx.scale)
        dk = torch.bmm(ds.transpose(1, 2), qh).mul_(ctx.scale)
        return dq, dk, dv, None, None


def matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention as two batched GEMMs with an FP32 softmax (the module docstring). [B, S, H, Dv]."""
    B, S, H, Dqk = q.shape
    T, Dv = k.shape[1], v.shape[-1]
    qh = q.transpose(1, 2).reshape(B * H, S, Dqk)
    kh = k.transpose(1, 2).reshape(B * H, T, Dqk)
    vh = v.transpose(1, 2).reshape(B * H, T, Dv)
    if mask is None:  # causal with the new tokens last: an additive -inf bias, broadcast over B*H
        bias = torch.full((S, T), float("-inf"), dtype=q.dtype, device=q.device).triu(T - S + 1)
    else:
        bias = torch.zeros(B, 1, S, T, dtype=q.dtype, device=q.device).masked_fill_(
            ~mask.unsqueeze(1), float("-inf")
        )
        bias = bias.expand(B, H, S, T).reshape(B * H, S, T)
    o = _MatmulAttention.apply(qh, kh, vh, bias, scale)
    return o.view(B, H, S, Dv).transpose(1, 2)  # [B, S, H, Dv]
