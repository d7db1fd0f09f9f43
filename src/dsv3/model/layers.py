"""Basic layers: RMSNorm and the SwiGLU MLP.

Linear layers are plain `nn.Linear` (bias-free): that is the seam FP8 swaps (`dsv3.fp8.convert_to_fp8`).
RMSNorm normalises in float32 and casts back before the weight, as transformers' DeepseekV3RMSNorm does,
so outputs match it bit for bit in fp32 and closely in bf16. Faster kernels for the same formulas (fused
norms, packed GEMVs for decode) live outside the model and are swapped in by whoever wants them
(`dsv3.cpu`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """weight * (x / sqrt(mean(x^2) + eps)), the normalisation in float32, cast back before the weight."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). HF names: gate_proj=w1, down_proj=w2, up_proj=w3."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
