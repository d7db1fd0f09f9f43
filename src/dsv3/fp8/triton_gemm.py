"""Blockwise-scaled FP8 GEMM kernels in Triton (Hopper sm_90, Ada sm_89), after DeepSeek's recipe.

Every kernel computes C = A @ B^T with E4M3 operands whose K dimension is contiguous and walks K in
chunks of BLOCK_K = 128, one scale tile per chunk:

    acc += tl.dot(a_chunk, b_chunk) * sa[:, None] * sb[None, :]

`tl.dot` on FP8 tiles runs on the tensor cores (whose internal accumulation is only ~14 bits wide);
multiplying its 128-deep partial sum by the tiles' scales and adding it to the fp32 register
accumulator is the paper's "promotion to CUDA cores every N_C = 128". Scales are passed transposed
([KB, rows], contiguous) so each chunk's scale vector is one coalesced load.

Import only where Triton and a CUDA GPU exist (dsv3.fp8.backends.get_backend does that). The numerical
reference is dsv3.fp8.backends.EmulatedBackend, never the Triton CPU interpreter (it rounds FP8 casts
differently from torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dsv3.fp8.quant import BLOCK, FP8_DTYPE, finish_scales, quantize_rowwise


def _dense_configs() -> list:
    shapes = [(128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (64, 256, 8, 3), (128, 256, 8, 3)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, w, s in shapes
    ]


def _grouped_configs() -> list:
    # BLOCK_M must divide 128 so that an M tile never straddles two experts' 128-aligned segments
    shapes = [(128, 128, 8, 3), (64, 128, 4, 4), (128, 256, 8, 3)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes
    ]


@triton.autotune(configs=_dense_configs(), key=["M", "N", "K", "B_BLOCK"])
@triton.jit
def _gemm_kernel(
    a_ptr,  # [M, K] e4m3
    b_ptr,  # [N, K] e4m3
    c_ptr,  # [M, N]
    as_ptr,  # [KB, M] fp32
    bs_ptr,  # [KB, N] fp32 (1x128 tiles) or [KB, ceil(N/128)] (128x128 blocks)
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    stride_as,
    stride_bs,
    B_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # B^T tile [BLOCK_K, BLOCK_N]
    as_ptrs = as_ptr + offs_m
    if B_BLOCK:
        bs_ptrs = bs_ptr + offs_n // BLOCK_K
    else:
        bs_ptrs = bs_ptr + offs_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0.0)
        sa = tl.load(as_ptrs + kb * stride_as, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptrs + kb * stride_bs, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_grouped_configs(), key=["N", "K"])
@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [R, K] e4m3, rows in 128-aligned expert segments
    b_ptr,  # [E, N, K] e4m3
    c_ptr,  # [R, N]
    as_ptr,  # [KB, R] fp32
    bs_ptr,  # [E, KB, NB] fp32
    chunk_expert_ptr,  # [R / 128] int32: expert of each 128-row chunk
    R,
    N,
    K,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    stride_as,
    stride_bse,
    stride_bs,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(chunk_expert_ptr + (pid_m * BLOCK_M) // BLOCK_K).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < R
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    as_ptrs = as_ptr + offs_m
    bs_ptrs = bs_ptr + e * stride_bse + offs_n // BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0.0)
        sa = tl.load(as_ptrs + kb * stride_as, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptrs + kb * stride_bs, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_grouped_configs(), key=["N", "K"])
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,  # [N, R] e4m3 (dy^T), 1x128 tiles along R
    b_ptr,  # [K, R] e4m3 (x^T)
    c_ptr,  # [E, N, K] fp32
    as_ptr,  # [R / 128, N] fp32
    bs_ptr,  # [R / 128, K] fp32
    offsets_ptr,  # [E + 1] int64, multiples of 128
    N,
    K,
    stride_an,
    stride_bk,
    stride_ce,
    stride_cn,
    stride_as,
    stride_bs,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_n = offs_n < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(start // BLOCK_K, end // BLOCK_K):
        k0 = kb * BLOCK_K
        a = tl.load(
            a_ptr + offs_m[:, None].to(tl.int64) * stride_an + (k0 + offs_k)[None, :],
            mask=mask_m[:, None],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_n[None, :].to(tl.int64) * stride_bk + (k0 + offs_k)[:, None],
            mask=mask_n[None, :],
            other=0.0,
        )
        sa = tl.load(as_ptr + kb * stride_as + offs_m, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptr + kb * stride_bs + offs_n, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + offs_m[:, None].to(tl.int64) * stride_cn + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _quantize_rowwise_kernel(
    x_ptr,  # [R, K] fp32/bf16, any strides
    q_ptr,  # [R, K] e4m3, contiguous
    s_ptr,  # [R, KB] fp32, contiguous
    K,
    KB,
    stride_xr,
    stride_xk,
    POW2: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One 1x128 tile per program, as DeepSeek's act_quant: s = amax / 448, q = x / s in E4M3."""
    r = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + r * stride_xr + offs.to(tl.int64) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    n_nan = tl.sum((x != x).to(tl.int32), axis=0)  # max() may skip NaN: count them explicitly
    s = tl.maximum(amax / 448.0, 1.1754943508222875e-38)
    if POW2:
        s = tl.exp2(tl.ceil(tl.log2(s)))
    s = tl.where(amax > 0, s, 1.0)
    s = tl.where((n_nan > 0) | (amax == float("inf")), float("nan"), s)
    q = tl.minimum(tl.maximum(x / s, -448.0), 448.0)
    tl.store(q_ptr + r * K + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + r * KB + kb, s)


class TritonBackend:
    """The dsv3.fp8.backends interface on the Triton kernels above."""

    name = "triton"

    def quantize_rowwise(
        self, x: torch.Tensor, pow2: bool = False, nonfinite: str = "raise", what: str = "tensor"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """1x128 tiles of x [R, K] in one fused kernel (any strides: dy^T needs no copy)."""
        if x.dim() != 2 or not x.is_cuda or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return quantize_rowwise(x, pow2=pow2, nonfinite=nonfinite, what=what)
        R, K = x.shape
        kb = -(-K // BLOCK)
        q = torch.empty(R, K, dtype=FP8_DTYPE, device=x.device)
        s = torch.empty(R, kb, dtype=torch.float32, device=x.device)
        if R and K:
            _quantize_rowwise_kernel[(R, kb)](
                x, q, s, K, kb, x.stride(0), x.stride(1), POW2=pow2, BLOCK_K=BLOCK, num_warps=1
            )
        return q, finish_scales(s, nonfinite, what)

    def gemm(
        self,
        a_q: torch.Tensor,
        a_s: torch.Tensor,
        b_q: torch.Tensor,
        b_s: torch.Tensor,
        b_block: bool,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        a_q, b_q = a_q.contiguous(), b_q.contiguous()
        M, K = a_q.shape
        N = b_q.shape[0]
        c = torch.empty(M, N, dtype=out_dtype, device=a_q.device)
        if M == 0 or N == 0:
            return c
        sa = a_s.float().t().contiguous()  # [KB, M]
        sb = b_s.float().t().contiguous()  # [KB, N or NB]

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _gemm_kernel[grid](
            a_q, b_q, c, sa, sb, M, N, K,
            a_q.stride(0), b_q.stride(0), c.stride(0), sa.stride(0), sb.stride(0),
            B_BLOCK=b_block, BLOCK_K=BLOCK,
        )  # fmt: skip
        return c

    def grouped_gemm(
        self,
        a_q: torch.Tensor,
        a_s: torch.Tensor,
        b_q: torch.Tensor,
        b_s: torch.Tensor,
        offsets: torch.Tensor,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        a_q, b_q = a_q.contiguous(), b_q.contiguous()
        R, K = a_q.shape
        E, N, _ = b_q.shape
        c = torch.empty(R, N, dtype=out_dtype, device=a_q.device)
        if R == 0:
            return c
        counts = (offsets[1:] - offsets[:-1]) // BLOCK
        chunk_expert = torch.repeat_interleave(
            torch.arange(E, device=a_q.device, dtype=torch.int32), counts, output_size=R // BLOCK
        )
        sa = a_s.float().t().contiguous()  # [KB, R]
        sb = b_s.float().transpose(1, 2).contiguous()  # [E, KB, NB]

        def grid(meta):
            return (triton.cdiv(R, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

        _grouped_gemm_kernel[grid](
            a_q, b_q, c, sa, sb, chunk_expert, R, N, K,
            a_q.stride(0), b_q.stride(0), b_q.stride(1), c.stride(0),
            sa.stride(0), sb.stride(0), sb.stride(1),
            BLOCK_K=BLOCK,
        )  # fmt: skip
        return c

    def grouped_wgrad(
        self,
        a_q: torch.Tensor,
        a_s: torch.Tensor,
        b_q: torch.Tensor,
        b_s: torch.Tensor,
        offsets: torch.Tensor,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        a_q, b_q = a_q.contiguous(), b_q.contiguous()
        N, R = a_q.shape
        K = b_q.shape[0]
        E = offsets.numel() - 1
        c = torch.empty(E, N, K, dtype=out_dtype, device=a_q.device)
        sa = a_s.float().t().contiguous()  # [R/128, N]
        sb = b_s.float().t().contiguous()  # [R/128, K]
        offs = offsets.to(device=a_q.device, dtype=torch.int64).contiguous()

        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"]), E)

        _grouped_wgrad_kernel[grid](
            a_q, b_q, c, sa, sb, offs, N, K,
            a_q.stride(0), b_q.stride(0), c.stride(0), c.stride(1), sa.stride(0), sb.stride(0),
            BLOCK_K=BLOCK,
        )  # fmt: skip
        return c


class ScaledMMBackend(TritonBackend):
    """Dense GEMMs through torch's cuBLAS blockwise-scaled FP8 GEMM (F.scaled_mm); grouped ones via Triton.

    Recipes: activations/gradients BlockWise1x128, weights BlockWise128x128 (Fprop, Dgrad), and
    1x128 x 1x128 for Wgrad. cuBLAS wants K a multiple of 128 (and N a multiple of 128 for 128x128 weight
    blocks); other shapes go to the Triton kernel. Scale layouts follow torch's checks: 1x128 scales
    [rows, KB] with stride (1, rows); 128x128 scales [L4, NB] with stride (1, L4), L4 = round_up(KB, 4)."""

    name = "scaled_mm"

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
        if not hasattr(F, "scaled_mm") or K % BLOCK or (b_block and N % BLOCK) or M == 0:
            return super().gemm(a_q, a_s, b_q, b_s, b_block, out_dtype)
        kb = K // BLOCK
        sa = a_s.float().t().contiguous().t()  # [M, KB], stride (1, M)
        if b_block:
            l4 = -(-kb // 4) * 4
            sb = F.pad(b_s.float(), (0, l4 - kb), value=1.0).contiguous().t()  # [L4, NB], stride (1, L4)
            recipe_b = F.ScalingType.BlockWise128x128
        else:
            sb = b_s.float().t().contiguous().t()  # [N, KB], stride (1, N)
            recipe_b = F.ScalingType.BlockWise1x128
        return F.scaled_mm(
            a_q.contiguous(),
            b_q.contiguous().t(),  # [K, N] column-major
            sa,
            F.ScalingType.BlockWise1x128,
            sb,
            recipe_b,
            output_dtype=out_dtype,
        )
