"""Differentiable all-to-alls for expert parallelism, and the FP8 wire format of the dispatch.

`all_to_all(x, out_splits, in_splits, group)` sends rows of x (grouped by destination rank,
in_splits[r] rows for rank r) and returns the rows received (out_splits[r] from rank r). Its backward is
the same exchange with the splits swapped. With `async_op=True` the forward only *starts* the exchange:
the caller must `wait()` the returned `Pending` before reading the output (the shared expert runs in
between). Gradients always travel synchronously.

FP8 dispatch (DeepSeek-V3 sends dispatched activations in FP8 and combines in BF16): each row is
quantised by the project's one quantiser, `dsv3.fp8.quant.quantize_rowwise` (1x128 tiles, scale = tile
amax / 448, the same codes and scales FP8Linear computes for its input). The E4M3 codes and the
scales' bytes go in one uint8 row (gloo does not move float8 dtypes): D + 4 * ceil(D / 128) bytes per
token instead of 2 D (BF16) or 4 D (FP32). The relative error of a value is then at most 2^-4 (E4M3 has
3 mantissa bits: half an ulp is 2^-4 of the power of two below the value) unless it falls below the
E4M3 normal range of its tile (|x| < scale * 2^-6), where the absolute error is at most scale * 2^-10.
A tile holding inf/NaN travels with a NaN scale (the quantiser's "propagate" policy: raising on one rank
would leave its peers blocked in the all-to-all), so it arrives as NaN on the receiving rank.
The backward of an FP8 dispatch is straight-through (the quantiser is treated as identity) and sends
the gradient in BF16 when the combine is BF16, else in the activations' dtype (expert_parallel.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dsv3.fp8.quant import BLOCK, FP8_DTYPE, dequantize_rowwise, quantize_rowwise


class Pending:
    """Handles of collectives started with async_op=True; `wait()` before reading their outputs."""

    def __init__(self) -> None:
        self.works: list[Any] = []
        self.keep: list[torch.Tensor] = []  # send buffers must outlive the collective

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works.clear()
        self.keep.clear()


def _exchange(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any, pending: Pending | None
) -> torch.Tensor:
    if len(in_splits) == 1:  # a group of one rank: nothing to exchange
        return x
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    x = x.contiguous()
    if pending is None:
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    else:
        pending.works.append(
            dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
        )
        pending.keep.append(x)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, pending, wire_dtype, grad_group):  # type: ignore[override]
        ctx.splits = (out_splits, in_splits)
        ctx.group = group if grad_group is None else grad_group
        ctx.dtype = x.dtype
        ctx.wire_dtype = wire_dtype
        send = x if wire_dtype is None else x.to(wire_dtype)
        out = _exchange(send, out_splits, in_splits, group, pending)
        if wire_dtype is not None and wire_dtype != x.dtype:
            if pending is not None:
                raise ValueError("an async all-to-all cannot change dtype on the wire")
            out = out.to(x.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        send = grad if ctx.wire_dtype is None else grad.to(ctx.wire_dtype)
        g = _exchange(send, in_splits, out_splits, ctx.group, None).to(ctx.dtype)
        return g, None, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: Any,
    pending: Pending | None = None,
    wire_dtype: torch.dtype | None = None,
    grad_group: Any = None,
) -> torch.Tensor:
    """Differentiable uneven all_to_all_single along dim 0 (wire_dtype: cast for the transfer only).

    grad_group: the communicator of the backward exchange (default `group`). A second communicator over
    the same ranks lets one thread run a forward's exchanges while another runs a backward's: each
    communicator then sees its collectives in the same order on every rank."""
    if sum(in_splits) != x.shape[0]:
        raise ValueError(f"all_to_all: in_splits sum to {sum(in_splits)} but x has {x.shape[0]} rows")
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, pending, wire_dtype, grad_group)


# --------------------------------------------------------------------------- FP8 wire format
def fp8_row_bytes(dim: int) -> int:
    """Bytes one token occupies in the FP8 dispatch: E4M3 codes plus one float32 scale per 1x128 tile."""
    return dim + 4 * (-(-dim // BLOCK))


def quantize_rows_fp8(x: torch.Tensor) -> torch.Tensor:
    """x [N, D] float -> packed uint8 [N, fp8_row_bytes(D)]: quantize_rowwise's E4M3 codes, then scales."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows_fp8 expects rows [N, D], got shape {tuple(x.shape)}")
    q, s = quantize_rowwise(x, nonfinite="propagate", what="expert-parallel dispatch")
    return torch.cat([q.view(torch.uint8), s.contiguous().view(torch.uint8)], dim=1)


def dequantize_rows_fp8(packed: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_rows_fp8`: packed uint8 [N, fp8_row_bytes(dim)] -> [N, dim] in dtype."""
    if packed.shape[1] != fp8_row_bytes(dim):
        raise ValueError(f"packed FP8 rows have {packed.shape[1]} bytes, expected {fp8_row_bytes(dim)}")
    q = packed[:, :dim].contiguous().view(FP8_DTYPE)
    s = packed[:, dim:].contiguous().view(torch.float32)
    return dequantize_rowwise(q, s).to(dtype)
