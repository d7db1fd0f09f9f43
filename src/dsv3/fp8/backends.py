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
- "emulated": any device, pure torch. FP8 values are exact in fp32, so each chunk's partial sum is an
  fp32 matmul of the raw E4M3 values; scaling and accumulation are fp32. This is the numerical
  reference for the GPU kernels (the Triton CPU interpreter rounds FP8 casts differently: not a reference).
- "triton": Hopper/Ada (sm_89+) Triton kernels, dsv3.fp8.triton_gemm.
- "scaled_mm": torch's cuBLAS blockwise-scaled GEMM (F.scaled_mm, 1x128 x 128x128 recipes) for dense
  GEMMs whose K is a multiple of 128; everything else goes to the Triton kernels.
- "auto": "triton" for tensors on an sm_89+ GPU with Triton installed, else "emulated".
"""

from __future__ import annotations

import importlib.util

import torch

from dsv3.fp8.quant import BLOCK
from dsv3.model.moe import grouped_mm

BACKENDS = ("auto", "emulated", "triton", "scaled_mm")
_WGRAD_CHUNK_BYTES = 64 << 20  # cap on the [chunks, N, K] fp32 partials of the emulated grouped Wgrad


def _kb(k: int) -> int:
    return -(-k // BLOCK)


def segment_ids(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """offsets [E+1] (starts of E segments, last = total) -> segment id of each of `length` positions."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(
        torch.arange(counts.numel(), device=offsets.device), counts, output_size=length
    )


class EmulatedBackend:
    """Exact E4M3 operands, per-128-K-chunk partial sums in fp32, scaled and promoted into fp32."""

    name = "emulated"

    def gemm(
        self,
        a_q: torch.Tensor,
        a_s: torch.Tensor,
        b_q: torch.Tensor,
        b_s: torch.Tensor,
        b_block: bool,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        M, K = a_q.shape
        N = b_q.shape[0]
        a, b = a_q.float(), b_q.float()
        sb = b_s.repeat_interleave(BLOCK, dim=0)[:N] if b_block else b_s  # [N, KB]
        acc = a.new_zeros(M, N)
        for kb in range(_kb(K)):
            k0, k1 = kb * BLOCK, min(K, (kb + 1) * BLOCK)
            p = a[:, k0:k1] @ b[:, k0:k1].t()  # the tensor core's job: <=128 exact products, summed
            p.mul_(a_s[:, kb : kb + 1])
            acc.addcmul_(p, sb[:, kb].unsqueeze(0))  # promotion: scaled, added to the fp32 accumulator
        return acc.to(out_dtype)

    def grouped_gemm(
        self,
        a_q: torch.Tensor,
        a_s: torch.Tensor,
        b_q: torch.Tensor,
        b_s: torch.Tensor,
        offsets: torch.Tensor,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        R, K = a_q.shape
        E, N, _ = b_q.shape
        acc = torch.zeros(R, N, dtype=torch.float32, device=a_q.device)
        if R == 0:
            return acc.to(out_dtype)
        counts = offsets[1:] - offsets[:-1]
        a, b = a_q.float(), b_q.float()
        row_scale_b = b_s[segment_ids(offsets, R)]  # [R, NB, KB]: each row's expert's block scales
        for kb in range(_kb(K)):
            k0, k1 = kb * BLOCK, min(K, (kb + 1) * BLOCK)
            p = grouped_mm(a[:, k0:k1].contiguous(), b[:, :, k0:k1].transpose(1, 2), counts)  # [R, N]
            p.mul_(a_s[:, kb : kb + 1])
            acc.addcmul_(p, row_scale_b[:, :, kb].repeat_interleave(BLOCK, dim=1)[:, :N])
        return acc.to(out_dtype)

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
        out = torch.zeros(E, N, K, dtype=torch.float32, device=a_q.device)
        if R == 0:
            return out.to(out_dtype)
        if R % BLOCK:
            raise ValueError(f"grouped_wgrad needs 128-aligned expert segments, got {R} rows")
        C = R // BLOCK
        chunk_expert = segment_ids(offsets, R)[::BLOCK]  # segments are 128-aligned: one expert per chunk
        # chunk -> expert summation matrix (a matmul of 0/1 weights: fast, and exact up to fp32 summation)
        onehot = torch.zeros(E, C, dtype=torch.float32, device=a_q.device)
        onehot[chunk_expert, torch.arange(C, device=a_q.device)] = 1.0
        a = a_q.float().view(N, C, BLOCK).permute(1, 0, 2)  # [C, N, 128]
        b = b_q.float().view(K, C, BLOCK).permute(1, 2, 0)  # [C, 128, K]
        sa, sb = a_s.t(), b_s.t()  # [C, N], [C, K]
        step = max(1, _WGRAD_CHUNK_BYTES // (4 * N * K))
        for c0 in range(0, C, step):
            c1 = min(C, c0 + step)
            p = torch.bmm(a[c0:c1], b[c0:c1])  # per chunk: 128 rows' exact products, summed
            p.mul_(sa[c0:c1].unsqueeze(2)).mul_(sb[c0:c1].unsqueeze(1))
            out.view(E, N * K).addmm_(onehot[:, c0:c1], p.view(c1 - c0, N * K))  # promotion, per expert
        return out.to(out_dtype)


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
