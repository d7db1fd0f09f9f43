"""Splitting a backward into its input-gradient part (I) and a deferred weight-gradient part (W).

Zero-bubble schedules run the backward of a chunk in two pieces: I computes only what the previous stage
waits for (dL/dx), W later computes dL/dW to fill what would otherwise be a bubble. As in DeepSeek's
DualPipe (`WeightGradStore`), this is done inside the layers that own the big weight GEMMs: while a
`WeightGradStore` is deferring, their backward returns the input gradient at once and queues a closure
that computes and accumulates the weight gradient later.

`enable_weight_grad_split(module, store)` switches, in place, the bias-free `nn.Linear` layers and the
`GroupedExperts` (routed experts) of a stage to such layers; parameters, names and forward numerics are
unchanged (the forward calls the same F.linear / grouped_mm with the same arguments, so losses are
bit-identical). While `store.capture` is off they run plain autograd (less Python on the backward): the
runtime turns it on only for the forwards whose backward the schedule splits into I and W. Everything else
(norms, the router, the embedding, attention's softmax) keeps computing its small weight gradients inside
I. Layers that are not plain `nn.Linear` (e.g. FP8 linears) are left alone and compute their weight
gradient in I. The store is an object held by the runtime, never a module
global, so two pipelines can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.moe import GroupedExperts, grouped_mm


class WeightGradStore:
    """Deferred weight-gradient closures, grouped under a key (the runtime uses (micro-batch, stage))."""

    def __init__(self) -> None:
        self.capture = True  # forwards record deferrable nodes; off = plain autograd (a full B follows)
        self.deferring = False
        self._pending: list[Callable[[], None]] = []
        self._ready: dict[Hashable, list[Callable[[], None]]] = {}

    @contextmanager
    def defer(self, key: Hashable) -> Iterator[None]:
        """Inside: weight gradients of split layers are queued under `key` instead of computed."""
        if key in self._ready:
            raise ValueError(f"weight gradients for {key!r} are already pending")
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
            self._ready[key] = self._pending
            self._pending = []

    def put(self, fn: Callable[[], None]) -> None:
        self._pending.append(fn)

    def run(self, key: Hashable) -> int:
        """Compute and accumulate the weight gradients queued under `key`; returns how many ran."""
        if key not in self._ready:
            raise ValueError(f"no deferred weight gradients for {key!r}")
        fns = self._ready.pop(key)
        with torch.no_grad():  # the closures read saved activations that may require grad
            for fn in fns:
                fn()
        return len(fns)

    def __len__(self) -> int:
        return len(self._ready)

    def clear(self) -> None:
        self._pending, self._ready = [], {}


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


class _LinearFn(torch.autograd.Function):
    """y = x W^T with a deferrable dW."""

    @staticmethod
    def forward(ctx, x, weight, store):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.store = store
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dx = dy.matmul(weight) if ctx.needs_input_grad[0] else None

        def weight_grad() -> torch.Tensor:
            return dy.reshape(-1, dy.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))

        if not ctx.needs_input_grad[1]:
            return dx, None, None
        if ctx.store.deferring:
            ctx.store.put(lambda: _accumulate(weight, weight_grad()))
            return dx, None, None
        return dx, weight_grad(), None


class SplitLinear(nn.Linear):
    """An nn.Linear (no bias) whose weight gradient can be deferred to a `WeightGradStore`."""

    wgrad_store: WeightGradStore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.wgrad_store.capture:
            return F.linear(x, self.weight)
        return _LinearFn.apply(x, self.weight, self.wgrad_store)


class _GroupedFn(torch.autograd.Function):
    """Rows sorted by expert times per-expert w[e]^T (w [E, N, K]) with a deferrable dW."""

    @staticmethod
    def forward(ctx, x, w, counts, store):  # type: ignore[override]
        ctx.save_for_backward(x, w, counts)
        ctx.store = store
        return grouped_mm(x, w.transpose(1, 2), counts)  # exactly the model's call

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w, counts = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_mm(dy, w, counts) if ctx.needs_input_grad[0] else None

        def weight_grad() -> torch.Tensor:  # dW[e] = dy_e^T x_e -> [E, N, K]
            xd = x.to(dy.dtype)
            if x.shape[0] > 0 and hasattr(F, "grouped_mm") and dy.dtype in (torch.float32, torch.bfloat16):
                try:
                    return F.grouped_mm(dy.t(), xd, offs=counts.cumsum(0).to(torch.int32))
                except RuntimeError:  # layout constraints of the kernel: fall back to the loop below
                    pass
            out, start = [], 0
            for n in counts.tolist():
                out.append(dy[start : start + n].t().matmul(xd[start : start + n]))
                start += n
            return torch.stack(out)

        if not ctx.needs_input_grad[1]:
            return dx, None, None, None
        if ctx.store.deferring:
            ctx.store.put(lambda: _accumulate(w, weight_grad()))
            return dx, None, None, None
        return dx, weight_grad().to(w.dtype), None, None


class SplitGroupedExperts(GroupedExperts):
    """GroupedExperts whose three weight gradients can be deferred to a `WeightGradStore`."""

    backend = "grouped_mm+wgrad_split"

    wgrad_store: WeightGradStore

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        s = self.wgrad_store
        if not s.capture:
            return super().forward_sorted(x, counts)
        h = F.silu(_GroupedFn.apply(x, self.w1, counts, s)) * _GroupedFn.apply(x, self.w3, counts, s)
        return _GroupedFn.apply(h, self.w2, counts, s)


def enable_weight_grad_split(module: nn.Module, store: WeightGradStore) -> int:
    """Switch the splittable layers under `module` to their deferrable versions; returns how many.

    Only exact `nn.Linear` without bias and exact `GroupedExperts` are switched (their class is swapped in
    place, keeping parameters and names); calling it again with another store rebinds them."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear and m.bias is None:
            m.__class__ = SplitLinear
        elif type(m) is GroupedExperts:
            m.__class__ = SplitGroupedExperts
        elif not isinstance(m, SplitLinear | SplitGroupedExperts):
            continue
        m.wgrad_store = store
        n += 1
    return n
