"""FP8 grouped GEMMs for the MoE's routed experts.

`FP8GroupedExperts` replaces `GroupedExperts` (same stacked parameters w1, w3 [E, I, D], w2 [E, D, I],
same `forward_sorted(x_sorted, counts)` seam expert parallelism calls) and runs each of the three
projections with the FP8Linear recipe as grouped GEMMs:

    Fprop  y_e  = x_e W_e^T     x: 1x128 tiles per token       W_e: 128x128 blocks per expert
    Dgrad  dx_e = dy_e W_e      dy: 1x128 tiles per token      W_e^T: the same blocks, transposed
    Wgrad  dW_e = dy_e^T x_e    128x1 tiles along the expert's tokens (x re-tiled from its FP8 cache)

Layout: the rows of each expert are placed in a segment padded with zero rows to a multiple of 128
("M-grouped contiguous", as DeepGEMM does). Then no 128-token tile of the Wgrad ever mixes two experts,
and every GPU tile of 128 rows belongs to exactly one expert. Padding rows are zeros in and out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.fp8.backends import get_backend
from dsv3.fp8.config import FP8Config
from dsv3.fp8.linear import output_dtype, quantize_act, quantize_input, quantize_weight, requantize_along_rows
from dsv3.fp8.quant import BLOCK, dequantize_blocks
from dsv3.model.moe import GroupedExperts


def padded_layout(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """counts [E] rows per expert -> (offsets [E+1] of 128-aligned segments, dest [rows] row index in the
    padded layout of each sorted row, padded row count)."""
    counts = counts.to(torch.int64)
    padded = (counts + BLOCK - 1) // BLOCK * BLOCK
    offsets = F.pad(padded.cumsum(0), (1, 0))
    starts = F.pad(counts.cumsum(0), (1, 0))[:-1]
    rows = int(counts.sum())
    seg = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), counts, output_size=rows
    )
    dest = torch.arange(rows, device=counts.device) - starts[seg] + offsets[:-1][seg]
    return offsets, dest, int(offsets[-1])


class _FP8GroupedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, weight, xq, xs, offsets, config: FP8Config, out_dtype: torch.dtype, name: str):
        wq, ws = quantize_weight(weight, config, f"{name} weight")
        y = get_backend(config.backend, xp.device).grouped_gemm(xq, xs, wq, ws, offsets, out_dtype=out_dtype)
        ctx.save_for_backward(xq, xs, weight, offsets)
        ctx.config, ctx.name, ctx.x_dtype = config, name, xp.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xq, xs, weight, offsets = ctx.saved_tensors
        cfg: FP8Config = ctx.config
        backend = get_backend(cfg.backend, dy.device)
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            what = f"gradient of {ctx.name} output"
            if ctx.needs_input_grad[0]:
                dyq, dys = quantize_act(dy, cfg, what)
                wq, ws = quantize_weight(weight, cfg, f"{ctx.name} weight")
                wt, wst = wq.transpose(1, 2), ws.transpose(1, 2)
                dx = backend.grouped_gemm(dyq, dys, wt, wst, offsets, out_dtype=ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                dyt_q, dyt_s = quantize_act(dy.t(), cfg, what)
                xt_q, xt_s = requantize_along_rows(xq, xs, cfg, f"{ctx.name} input")
                dw = backend.grouped_wgrad(dyt_q, dyt_s, xt_q, xt_s, offsets, out_dtype=torch.float32)
                dw = dw.to(weight.dtype)
        return dx, dw, None, None, None, None, None, None


def fp8_grouped_linear(
    xp: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, config: FP8Config, name: str = "experts"
) -> torch.Tensor:
    """xp [R, K] rows in 128-aligned expert segments (offsets [E+1]), weight [E, N, K] -> [R, N] in FP8."""
    out_dtype = output_dtype(xp)
    xq, xs = quantize_input(xp, config, f"{name} input")
    with torch.autocast(xp.device.type, enabled=False):
        return _FP8GroupedLinearFn.apply(xp, weight, xq, xs, offsets, config, out_dtype, name)


class FP8GroupedExperts(GroupedExperts):
    """GroupedExperts with FP8 grouped GEMMs; parameters and state-dict keys unchanged."""

    backend = "fp8"

    def __init__(
        self, n_experts: int, dim: int, inter_dim: int, config: FP8Config | None = None, name: str = "experts"
    ):
        super().__init__(n_experts, dim, inter_dim)
        self.fp8_config = FP8Config.resolve(config)
        self.fp8_name = name

    @classmethod
    def from_experts(
        cls, experts: GroupedExperts, config: FP8Config | None = None, name: str = "experts"
    ) -> FP8GroupedExperts:
        """Wrap existing experts, sharing their Parameter objects."""
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        m.n_experts = experts.n_experts
        m.w1, m.w2, m.w3 = experts.w1, experts.w2, experts.w3
        m.fp8_config = FP8Config.resolve(config)
        m.fp8_name = name
        return m

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [rows, D] sorted by expert with counts [E] -> expert outputs [rows, D] (not yet gated)."""
        if counts.numel() != self.n_experts:
            raise ValueError(
                f"{self.fp8_name}: counts has {counts.numel()} entries for {self.n_experts} experts"
            )
        offsets, dest, rows_p = padded_layout(counts)
        xp = x.new_zeros(rows_p, x.shape[1]).index_copy(0, dest, x)
        cfg, n = self.fp8_config, self.fp8_name
        h = F.silu(fp8_grouped_linear(xp, self.w1, offsets, cfg, f"{n}.w1")) * fp8_grouped_linear(
            xp, self.w3, offsets, cfg, f"{n}.w3"
        )
        y = fp8_grouped_linear(h, self.w2, offsets, cfg, f"{n}.w2")
        return y.index_select(0, dest)

    def dequantized_weights(self) -> dict[str, torch.Tensor]:
        """w1, w2, w3 as the FP8 GEMMs see them (per-expert 128x128-block E4M3 round trip)."""
        with torch.no_grad():
            return {
                k: dequantize_blocks(
                    *quantize_weight(getattr(self, k), self.fp8_config, f"{self.fp8_name}.{k}")
                )
                for k in ("w1", "w2", "w3")
            }

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, fp8_backend={self.fp8_config.backend}"
