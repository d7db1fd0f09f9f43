"""Basic layers: RMSNorm, the SwiGLU MLP, and the packed GEMV that CPU decoding runs them with.

Linear layers are plain `nn.Linear` (bias-free): that is the seam FP8 swaps (`dsv3.fp8.convert_to_fp8`).
RMSNorm normalises in float32 and casts back before the weight, as transformers' DeepseekV3RMSNorm does,
so outputs match it bit for bit in fp32 and closely in bf16 (FP32 inference on CPU computes the same
formula with a fused kernel, equal up to summation order: `RMSNorm._cpu_inference`).

Decoding on CPU multiplies a few rows by each weight, so it is bound by reading the weights from memory,
and `F.linear` with the [out, in] weight reads them at ~8 GB/s on one core here (MKL's GEMV). `PackedGEMV`
keeps a copy of the weight as [P, in, out/P] (P = intra-op threads) and runs one `bmm`: each thread
streams its own contiguous [in, out/P] slab, 2-4x faster for the multi-MB weights of the head and the
dense MLP (see BENCHMARKS.md). Several Linears that read the same input (w1 and w3) share one pack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Most rows (tokens) a packed GEMV takes: decode steps and short verifies. Longer inputs are GEMMs,
# where the plain layout reuses each weight row across many tokens.
_GEMV_MAX_ROWS = 32


def weights_key(*weights: torch.Tensor) -> tuple:
    """Identity of weights' current values (storage and in-place version counter): caches derived from
    weights (packed copies, absorbed MLA matrices, expert tables) are rebuilt when it changes."""
    return tuple((w.data_ptr(), w._version) for w in weights)


class Derived:
    """One value derived from weights (a packed copy, a table), rebuilt when its key changes."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value = None

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key != self.key:
            self.value = build()
            self.key = key
        return self.value


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._weight2 = Derived()  # [weight; weight] for the CPU inference path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            if x.device.type == "cpu" and x.numel() <= _GEMV_MAX_ROWS * x.shape[-1]:
                y = self._cpu_inference(x)
                if y is not None:
                    return y
            # torch's rms_norm computes this very formula (bitwise equal)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def _cpu_inference(self, x: torch.Tensor) -> torch.Tensor | None:
        """The first half of LayerNorm([x, -x]) with weight [w; w]: [x, -x] has mean 0 and variance
        mean(x^2), so this is x * rsqrt(mean(x^2) + eps) * w, the same formula up to the order of the
        sums (FP32 rounding, ~1e-7 relative). CPU LayerNorm is one fused kernel where CPU rms_norm runs
        about six: at decode (a few rows, 17 norms per token for the tiny preset) that is ~5% of a step.
        (On many rows it is slower: decode-sized inputs only.) None for weights without a version counter
        (inference tensors)."""
        w = self.weight
        try:
            key = weights_key(w)
        except RuntimeError:
            return None
        w2 = self._weight2.get(key, lambda: torch.cat([w, w]).detach())
        D = x.shape[-1]
        return F.layer_norm(torch.cat([x, -x], dim=-1), (2 * D,), w2, None, self.eps)[..., :D]


class PackedGEMV:
    """y = x [W_1; W_2; ...]^T for a few rows of x on CPU, from a cached [P, in, out/P] copy of the
    concatenated weights (one `bmm`, P slabs read in parallel). Returns None where it does not apply
    (autograd, not CPU fp32/bf16, more than _GEMV_MAX_ROWS rows, not plain nn.Linear, inference tensors
    without version counters); the caller then runs its Linears. The copy is rebuilt when a weight's
    storage or version counter changes, so in-place updates are seen.

    slabs=False keeps the concatenation in the [out, in] layout and runs one `F.linear`: for weights too
    small for the slab split to pay (MLA's down-projections), what is saved is the separate calls."""

    def __init__(self, slabs: bool = True) -> None:
        self.slabs = slabs
        self._packed = Derived()  # value None: the packed product does not apply to those weights

    def __call__(self, x: torch.Tensor, *linears: nn.Module) -> torch.Tensor | None:
        # decode calls this a few times per token: the hit path is a key compare (~1 us); every check
        # on the modules and weights runs when the key changes, and its verdict is cached with it
        if torch.is_grad_enabled() or x.numel() > _GEMV_MAX_ROWS * x.shape[-1]:
            return None
        try:
            key = (x.dtype, torch.get_num_threads(), weights_key(*[m.weight for m in linears]))
        except (AttributeError, RuntimeError):  # no .weight, or inference tensors (no version counter)
            return None
        w = self._packed.get(key, lambda: self._pack(x.dtype, linears))
        if w is None:
            return None
        if not self.slabs:
            return F.linear(x, w)
        P, K, Op = w.shape
        y = torch.bmm(x.reshape(1, -1, K).expand(P, -1, K), w)  # [P, rows, O/P]
        return y.transpose(0, 1).reshape(*x.shape[:-1], P * Op)

    def _pack(self, dtype: torch.dtype, linears: tuple[nn.Module, ...]) -> torch.Tensor | None:
        """The packed copy of the linears' weights, or None where the packed product does not apply."""
        weights = [m.weight for m in linears]
        if (
            dtype not in (torch.float32, torch.bfloat16)
            or any(type(m) is not nn.Linear or m.bias is not None for m in linears)
            or any(w.dtype != dtype or w.device.type != "cpu" for w in weights)
        ):
            return None
        w = torch.cat(weights) if len(weights) > 1 else weights[0]
        if self.slabs:
            O, K = w.shape
            P = next(p for p in range(min(torch.get_num_threads(), 8), 0, -1) if O % p == 0)
            w = w.reshape(P, O // P, K).transpose(1, 2).contiguous()
        return w.detach()

    def linear(self, x: torch.Tensor, layer: nn.Module, enabled: bool) -> torch.Tensor:
        """layer(x), as a packed GEMV when enabled and it applies."""
        y = self(x, layer) if enabled else None
        return layer(x) if y is None else y


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). HF names: gate_proj=w1, down_proj=w2, up_proj=w3."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.decode_gemv = False  # set by the inference engine: few-row inputs run as packed GEMVs
        self._gemv13, self._gemv2 = PackedGEMV(), PackedGEMV()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_gemv:
            h = self._gemv13(x, self.w1, self.w3)
            if h is not None:
                gate, up = h.chunk(2, dim=-1)
                return self._gemv2.linear(F.silu(gate) * up, self.w2, True)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
