"""AdamW with optional BF16 moments, the paper's parameter groups, and gradient clipping.

Master weights and gradients stay FP32. With moments_dtype=bfloat16 the two Adam moments are stored
in BF16 (halving optimizer memory, as DeepSeek-V3 does) and widened to FP32 for the update: with
beta2 = 0.95 each step moves v by 5%, far above BF16's 0.4% resolution, so nothing stalls (with
beta2 = 0.999 it would). The update itself is torch's AdamW (decoupled weight decay):

    p <- p * (1 - lr * wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)

Weight decay applies to matrices only: not to norms, biases or the embedding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[decayed matrices, everything else]: norms, biases (1-D) and embeddings get no weight decay."""
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.dim() < 2 or id(p) in embeds else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class AdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        moments_dtype: torch.dtype = torch.float32,
    ):
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        if moments_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moments_dtype must be float32 or bfloat16, got {moments_dtype}")
        self.moments_dtype = moments_dtype
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("AdamW.step does not take a closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
            # steps can differ between params (one that got no grad earlier): bucket by step count
            buckets: dict[float, list[torch.Tensor]] = {}
            for p in params:
                st = self.state[p]
                st["step"] += 1
                buckets.setdefault(float(st["step"]), []).append(p)
            for t, ps in buckets.items():
                self._update(ps, lr, b1, b2, eps, wd, t)

    def _update(
        self, ps: list[torch.Tensor], lr: float, b1: float, b2: float, eps: float, wd: float, t: float
    ):
        grads = [p.grad for p in ps]
        ms = [self.state[p]["exp_avg"] for p in ps]
        vs = [self.state[p]["exp_avg_sq"] for p in ps]
        low = self.moments_dtype != torch.float32
        m32 = [m.float() for m in ms] if low else ms
        v32 = [v.float() for v in vs] if low else vs
        if wd != 0:
            torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(m32, grads, 1 - b1)
        torch._foreach_mul_(v32, b2)
        torch._foreach_addcmul_(v32, grads, grads, 1 - b2)
        bc1 = 1 - b1**t
        bc2_sqrt = math.sqrt(1 - b2**t)
        denom = torch._foreach_sqrt(v32)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, m32, denom, -lr / bc1)
        if low:
            torch._foreach_copy_(ms, m32)
            torch._foreach_copy_(vs, v32)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype on load: restore the moments' dtype
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = st[k].to(self.moments_dtype)


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (FP32 scalar; inf/nan when any gradient is non-finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)


def clip_grads(params: Iterable[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale gradients so their global norm is at most max_norm (given the precomputed norm)."""
    torch.nn.utils.clip_grads_with_norm_(list(params), max_norm, total_norm, foreach=True)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
