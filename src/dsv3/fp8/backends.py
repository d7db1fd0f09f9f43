"""The one seam for FP8 GEMMs: every FP8 matrix product in dsv3 goes through a `Backend`.

All GEMMs are "NT": C = A @ B^T with both operands stored row-major with K (the reduced dimension)
contiguous, both in E4M3 with fp32 dequantisation scales along K in groups of 128:
- `gemm`: A [M, K] with 1x128 tile scales [M, KB]; B [N, K] with 1x128 tile scales [N, KB]
  (b_block=False) or 128x128 block scales [ceil(N/128), KB] (b_block=True, a weight).
- `grouped_gemm` (MoE Fprop/Dgrad, "M-grouped"): rows of A sorted by expert in segments padded to
  multiples of 128 (offsets [E+1]); B [E, N, K] with block scales [E, NB, KB]; rows of expert e use B[e].
- `grouped_wgrad` (MoE Wgrad, "K-grouped"): A [N, R], B [K, R], both tiled 1x128 along R, with the same
  128-aligned expert segments along R; returns [E, N, K] with expert e reducing over its segment only.

Accumulation follows the recipe: the products of one 128-wide K chunk are summed (on Hopper, inside the
tensor core), then multiplied by the two tiles' scales and added to an FP32 accumulator ("promotion
every N_C = 128 elements"). Backends:
- "emulated": any device, pure torch: exact E4M3 values and scales, dequantised to fp32, fp32 GEMMs
  (fp32 accumulation over all of K). The numerical reference for the GPU kernels (the Triton CPU
  interpreter rounds FP8 casts differently from torch: it is not a reference).
- "triton": Hopper/Ada (sm_89+) Triton kernels, dsv3.fp8.triton_gemm.
- "scaled_mm": torch's cuBLAS blockwise-scaled GEMM (F.scaled_mm, 1x128 x 128x128 recipes) for dense
  GEMMs whose K is a multiple of 128; everything else goes to the Triton kernels.
- "auto": "triton" for tensors on an sm_89+ GPU with Triton installed, else "emulated".
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from dsv3.fp8.quant import BLOCK, dequantize_blocks, dequantize_rowwise, quantize_rowwise
from dsv3.model.moe import grouped_mm

BACKENDS = ("auto", "emulated", "triton", "scaled_mm")


class EmulatedBackend:
    """Exact E4M3 operands and scales, dequantised to fp32, then fp32 GEMMs.

    An E4M3 value times its fp32 scale is exact to one fp32 rounding, and the GEMM accumulates in
    fp32 across the whole of K: at least the precision that promotion every 128 elements buys on the
    GPU (and what DeepSeek's recipe aims for), without emulating the tensor core's narrower internal
    accumulator. The chunk-by-chunk order of the GPU kernels is reproduced only to fp32 rounding."""

    name = "emulated"

    def quantize_rowwise(
        self, x: torch.Tensor, pow2: bool = False, nonfinite: str = "raise", what: str = "tensor"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """1x128 tiles of an activation or gradient x [rows, K] (dsv3.fp8.quant.quantize_rowwise)."""
        return quantize_rowwise(x, pow2=pow2, nonfinite=nonfinite, what=what)

    def gemm(
        self,
        a_q: torch.Tensor,
        a_s: torch.Tensor,
        b_q: torch.Tensor,
        b_s: torch.Tensor,
        b_block: bool,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        a = dequantize_rowwise(a_q, a_s)
        b = dequantize_blocks(b_q, b_s) if b_block else dequantize_rowwise(b_q, b_s)
        return (a @ b.t()).to(out_dtype)

    def grouped_gemm(
        self,
        a_q: torch.Tensor,
        a_s: torch.Tensor,
        b_q: torch.Tensor,
        b_s: torch.Tensor,
        offsets: torch.Tensor,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        R = a_q.shape[0]
        N = b_q.shape[1]
        if R == 0:
            return torch.zeros(0, N, dtype=out_dtype, device=a_q.device)
        a = dequantize_rowwise(a_q, a_s)
        b = dequantize_blocks(b_q, b_s)  # [E, N, K]
        return grouped_mm(a, b.transpose(1, 2), offsets[1:] - offsets[:-1]).to(out_dtype)

    def grouped_wgrad(
        self,
        a_q: torch.Tensor,
        a_s: torch.Tensor,
        b_q: torch.Tensor,
        b_s: torch.Tensor,
        offsets: torch.Tensor,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        N, R = a_q.shape
        K = b_q.shape[0]
        E = offsets.numel() - 1
        if R % BLOCK:
            raise ValueError(f"grouped_wgrad needs 128-aligned expert segments, got {R} rows")
        if R == 0:
            return torch.zeros(E, N, K, dtype=out_dtype, device=a_q.device)
        a = dequantize_rowwise(a_q, a_s)  # [N, R]
        b = dequantize_rowwise(b_q, b_s)  # [K, R]
        if (
            hasattr(F, "grouped_mm") and a.device.type == "cpu"
        ):  # K-grouped: expert e reduces over its segment
            return F.grouped_mm(a, b.t(), offs=offsets[1:].to(torch.int32)).to(out_dtype)
        bounds = offsets.tolist()
        return torch.stack([a[:, s0:s1] @ b[:, s0:s1].t() for s0, s1 in zip(bounds[:-1], bounds[1:])]).to(
            out_dtype
        )


def reference_gemm(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    b_block: bool,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The recipe step by step (slow; a test reference): for each 128-wide K chunk, the partial sum of raw
    E4M3 products is scaled by the A tile's and the B tile's (or block's) scales and added to the
    accumulator ("promotion every N_C = 128"). Same operand layouts as `EmulatedBackend.gemm`."""
    M, K = a_q.shape
    N = b_q.shape[0]
    sb = b_s.repeat_interleave(BLOCK, dim=0)[:N] if b_block else b_s  # [N, KB]
    acc = torch.zeros(M, N, dtype=dtype, device=a_q.device)
    for kb in range(-(-K // BLOCK)):
        k0, k1 = kb * BLOCK, min(K, (kb + 1) * BLOCK)
        part = a_q[:, k0:k1].to(dtype) @ b_q[:, k0:k1].to(dtype).t()
        acc += part * a_s[:, kb : kb + 1].to(dtype) * sb[:, kb].to(dtype)
    return acc


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def fp8_gpu_available(device: torch.device | str | None = None) -> bool:
    """A CUDA device with FP8 tensor cores (sm_89 Ada, sm_90 Hopper or newer)."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def get_backend(name: str = "auto", device: torch.device | str | None = None):
    """Backend by name; "auto" picks "triton" for an FP8-capable GPU device with Triton, else "emulated"."""
    if name not in BACKENDS:
        raise ValueError(f"unknown fp8 backend {name!r}; choose one of {BACKENDS}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name == "auto":
        name = (
            "triton" if dev.type == "cuda" and triton_available() and fp8_gpu_available(dev) else "emulated"
        )
    if name == "emulated":
        return EmulatedBackend()
    if not (torch.cuda.is_available() and triton_available()):
        raise ValueError(f"fp8 backend {name!r} needs a CUDA GPU and Triton; use 'emulated' on this machine")
    if not fp8_gpu_available(dev if dev.type == "cuda" else None):
        raise ValueError(f"fp8 backend {name!r} needs FP8 tensor cores (sm_89+); this GPU has none")
    if name == "scaled_mm" and not hasattr(torch.nn.functional, "scaled_mm"):
        raise ValueError(
            f"fp8 backend 'scaled_mm' needs torch.nn.functional.scaled_mm (torch {torch.__version__})"
        )
    from dsv3.fp8 import triton_gemm

    return triton_gemm.ScaledMMBackend() if name == "scaled_mm" else triton_gemm.TritonBackend()
