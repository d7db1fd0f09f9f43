"""FP8Linear: a Linear whose three GEMMs (Fprop, Dgrad, Wgrad) run on E4M3 operands with fine-grained scales.

    Fprop  y  = x W^T      x: 1x128 tiles along K (per token)   W: 128x128 blocks
    Dgrad  dx = dy W       dy: 1x128 tiles along N (per token)  W^T: the same 128x128 blocks, transposed
    Wgrad  dW = dy^T x     dy^T and x^T: 1x128 tiles along the tokens (128x1 tiles of dy and x)

Every GEMM accumulates in fp32 with promotion every 128 elements of K (dsv3.fp8.backends). The module
keeps its fp32 master weight (`weight`, an ordinary Parameter, so state dicts and optimizers do not
change) and quantises it on the fly each step from its current amax. Saved for backward: the input in
FP8 with its 1x128 scales (not a BF16 copy) and the master weight itself (no new memory); the weight's
FP8 blocks are recomputed in backward (identical to Fprop's, cheap next to the GEMMs). For Wgrad the
cached 1x128-tiled input is dequantised and re-tiled along tokens, as DeepSeek-V3 does on H800 (sec. 3.5).

Sibling projections that read the same activation tensor (wq_a and wkv_a; w1 and w3) share one
quantised copy: it is cached on the tensor object, keyed by its version counter.

Outputs come back in the autocast dtype when autocast is on (BF16 in training), else in x's dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dsv3.fp8.backends import get_backend
from dsv3.fp8.config import FP8Config
from dsv3.fp8.quant import dequantize_rowwise, fake_quantize_blocks, quantize_blocks

_CACHE_ATTR = "_dsv3_fp8_rowwise"


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an ordinary Linear would return for x under the current autocast state."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def quantize_act(x: torch.Tensor, config: FP8Config, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An activation or gradient x [rows, K] -> 1x128 tiles, on the backend's quantiser."""
    backend = get_backend(config.backend, x.device)
    return backend.quantize_rowwise(x, pow2=config.pow2_scales, nonfinite=config.nonfinite, what=what)


def quantize_weight(w: torch.Tensor, config: FP8Config, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [..., N, K] -> 128x128 blocks."""
    return quantize_blocks(w, pow2=config.pow2_scales, nonfinite=config.nonfinite, what=what)


def quantize_input(x: torch.Tensor, config: FP8Config, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [rows, K] E4M3, s [rows, ceil(K/128)]): 1x128 tiles, shared by sibling GEMMs."""
    key = (x._version, tuple(x.shape), config.pow2_scales, config.nonfinite)
    hit = getattr(x, _CACHE_ATTR, None)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    with torch.no_grad():
        q, s = quantize_act(x.detach().reshape(-1, x.shape[-1]), config, what)
    with contextlib.suppress(AttributeError, RuntimeError):  # a tensor refusing attributes just is not shared
        setattr(x, _CACHE_ATTR, (key, q, s))
    return q, s


def requantize_along_rows(q: torch.Tensor, s: torch.Tensor, config: FP8Config, what: str):
    """A [rows, K] tensor cached in 1x128 tiles -> its transpose [K, rows] in 1x128 tiles along rows."""
    return quantize_act(dequantize_rowwise(q, s).t(), config, what)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, xq, xs, config: FP8Config, out_dtype: torch.dtype, name: str):
        wq, ws = quantize_weight(weight, config, f"{name} weight")
        y = get_backend(config.backend, x2d.device).gemm(xq, xs, wq, ws, b_block=True, out_dtype=out_dtype)
        ctx.save_for_backward(xq, xs, weight)
        ctx.config, ctx.name, ctx.x_dtype = config, name, x2d.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xq, xs, weight = ctx.saved_tensors
        cfg: FP8Config = ctx.config
        backend = get_backend(cfg.backend, dy.device)
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            grad_what = f"gradient of {ctx.name} output"
            if ctx.needs_input_grad[0]:  # Dgrad: dy 1x128 tiles along N, the weight's blocks transposed
                dyq, dys = quantize_act(dy, cfg, grad_what)
                wq, ws = quantize_weight(weight, cfg, f"{ctx.name} weight")
                dx = backend.gemm(dyq, dys, wq.t(), ws.t(), b_block=True, out_dtype=ctx.x_dtype)
            if ctx.needs_input_grad[1]:  # Wgrad: dy^T and x^T in 1x128 tiles along the tokens
                dyt_q, dyt_s = quantize_act(dy.t(), cfg, grad_what)
                xt_q, xt_s = requantize_along_rows(xq, xs, cfg, f"{ctx.name} input")
                dw = backend.gemm(dyt_q, dyt_s, xt_q, xt_s, b_block=False, out_dtype=torch.float32)
                dw = dw.to(weight.dtype)
        return dx, dw, None, None, None, None, None


class FP8Linear(nn.Linear):
    """nn.Linear with FP8 GEMMs (same parameters and state-dict keys as the Linear it replaces)."""

    fp8_config: FP8Config
    fp8_name: str

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        config: FP8Config | None = None,
        name: str = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8_config = FP8Config.resolve(config)
        self.fp8_name = name

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: FP8Config | None = None, name: str = "linear"
    ) -> FP8Linear:
        """Wrap an existing Linear, sharing its Parameter objects (optimizers built before keep working)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight = linear.weight
        m.bias = linear.bias
        m.fp8_config = FP8Config.resolve(config)
        m.fp8_name = name
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.fp8_name}: expected input with last dim {self.in_features}, got {tuple(x.shape)}"
            )
        out_dtype = output_dtype(x)
        xq, xs = quantize_input(x, self.fp8_config, f"{self.fp8_name} input")
        with torch.autocast(x.device.type, enabled=False):
            y = _FP8LinearFn.apply(
                x.reshape(-1, self.in_features),
                self.weight,
                xq,
                xs,
                self.fp8_config,
                out_dtype,
                self.fp8_name,
            )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as the FP8 GEMMs see it (128x128-block E4M3 round trip), with a straight-through
        gradient to the master weight. The absorbed MLA decode path reads wkv_b through this."""
        cfg = self.fp8_config
        with torch.no_grad():
            wq = fake_quantize_blocks(self.weight, pow2=cfg.pow2_scales, nonfinite=cfg.nonfinite)
        return self.weight + (wq.to(self.weight.dtype) - self.weight).detach()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8_backend={self.fp8_config.backend}"
