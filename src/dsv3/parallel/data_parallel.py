"""Data parallelism with ZeRO-1: FP32 gradient reduction over the right groups, sharded optimizer states.

Every data-parallel rank computes the loss of its own batch slice (a mean over its tokens), so the loss
of the global batch is the mean over the dp * ep ranks, and every gradient is divided by dp * ep:

- dense parameters (attention, norms, router, shared experts, embedding, head) are replicated on every
  rank of a pipeline stage: their gradients are summed over `mesh.data_group`;
- a routed expert lives on one EP rank of each of the dp replicas, and its gradient already holds the
  contributions of the whole EP group's tokens (the dispatch's backward brought them): it is summed over
  `mesh.dp_group` only, the ranks that hold the same experts.

Reductions run on flat float32 buffers whatever the parameter dtype (one collective per group).

ZeRO-1 (DeepSeek-V3 trains with ZeRO-1): each parameter is owned by one rank of its reduction group
(greedy balance by size). The gradients are reduce-scattered so that each rank receives only the
gradients it owns; the optimizer's param_groups are filtered to owned parameters, so its states (AdamW
moments) exist on one rank only; after the step the updated parameters are all-gathered. Any
torch.optim optimizer works: it is used as built (learning-rate schedules keep setting param_groups).
The gradient norm for clipping is the global one (each rank sums the squares of what it owns; one
all-reduce over the world), so every rank clips by the same factor and agrees on skipping a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv3.parallel.expert_parallel import ep_moe_layers
from dsv3.parallel.mesh import Mesh, group_size


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


@dataclass
class _Bucket:
    """Parameters reduced over one group, laid out as n equal segments (one per owner rank)."""

    name: str
    params: list[nn.Parameter]
    group: Any
    n: int
    me: int  # this rank's index in the group
    owner: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    seg: int = 0  # segment length (elements): the largest owner's total

    def partition(self) -> None:
        loads = [0] * self.n
        owner = [0] * len(self.params)
        for i in sorted(range(len(self.params)), key=lambda i: (-self.params[i].numel(), i)):
            r = min(range(self.n), key=lambda r: (loads[r], r))
            owner[i] = r
            loads[r] += self.params[i].numel()
        fill = [0] * self.n
        self.owner, self.offset = owner, []
        for i, p in enumerate(self.params):
            self.offset.append(fill[owner[i]])
            fill[owner[i]] += p.numel()
        self.seg = max(loads) if loads else 0

    def slot(self, i: int) -> slice:
        start = self.owner[i] * self.seg + self.offset[i]
        return slice(start, start + self.params[i].numel())

    def owned(self, i: int) -> bool:
        return self.owner[i] == self.me

    def local(self, i: int) -> slice:
        return slice(self.offset[i], self.offset[i] + self.params[i].numel())


class DataParallel:
    """Gradient reduction, global-norm clipping and (with zero1) sharded optimizer steps.

    Per step:  loss.backward(); dp.reduce_gradients(); norm = dp.clip_grad_norm_(1.0); dp.step();
    dp.zero_grad(). With zero1 a rank's non-owned parameters have grad None after reduce_gradients."""

    def __init__(
        self,
        model: nn.Module,
        mesh: Mesh,
        optimizer: torch.optim.Optimizer | None = None,
        zero1: bool | None = None,
    ):
        self.model, self.mesh, self.optimizer = model, mesh, optimizer
        self.zero1 = mesh.config.zero1 if zero1 is None else zero1
        self.divisor = mesh.data_size
        expert_ids = {id(p) for m in ep_moe_layers(model) for p in m.experts.parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = []
        for name, group, ps in (
            ("dense", mesh.data_group, [p for p in params if id(p) not in expert_ids]),
            ("experts", mesh.dp_group, [p for p in params if id(p) in expert_ids]),
        ):
            n = group_size(group)
            me = dist.get_rank(group) if n > 1 else 0
            b = _Bucket(name, ps, group, n, me)
            b.partition()
            self.buckets.append(b)
        if optimizer is not None and self.zero1:
            self._shard_optimizer(optimizer)

    # ------------------------------------------------------------------ setup
    def _shard_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep only owned parameters in the optimizer's param_groups (their states are created lazily)."""
        if optimizer.state:
            raise ValueError("shard the optimizer before its first step (it already holds states)")
        owned: dict[int, bool] = {}
        for b in self.buckets:
            for i, p in enumerate(b.params):
                owned[id(p)] = b.owned(i)
        for g in optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in owned and p.requires_grad:
                    raise ValueError("the optimizer holds a parameter that is not in the model")
            g["params"] = [p for p in g["params"] if owned.get(id(p), False)]

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Make replicas identical: dense parameters and buffers from the first rank of the data group,
        experts from the first rank of their dp group."""
        for b in self.buckets:
            if b.n > 1 and b.params:
                flat = torch.cat([p.detach().float().reshape(-1) for p in b.params])
                dist.broadcast(flat, dist.get_global_rank(b.group, 0), group=b.group)
                self._unflatten_into(b.params, flat)
        bufs = [t for t in self.model.buffers() if t.is_floating_point()]
        g = self.mesh.data_group
        if group_size(g) > 1 and bufs:
            flat = torch.cat([t.float().reshape(-1) for t in bufs])
            dist.broadcast(flat, dist.get_global_rank(g, 0), group=g)
            self._unflatten_into(bufs, flat)

    @staticmethod
    def _unflatten_into(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
        start = 0
        for t in tensors:
            n = t.numel()
            t.data.copy_(flat[start : start + n].view_as(t))
            start += n

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Sum gradients in FP32 over each bucket's group and divide by dp * ep (missing grads count as 0)."""
        for b in self.buckets:
            if not b.params:
                continue
            flat = torch.zeros(b.n * b.seg, dtype=torch.float32, device=b.params[0].device)
            for i, p in enumerate(b.params):
                if p.grad is not None:
                    flat[b.slot(i)] = p.grad.detach().reshape(-1).float()
            if b.n == 1:
                mine, base = flat, 0
            elif self.zero1:
                mine = torch.empty(b.seg, dtype=torch.float32, device=flat.device)
                _reduce_scatter(mine, flat, b.group)
                base = b.me * b.seg
            else:
                dist.all_reduce(flat, group=b.group)
                mine, base = flat, 0
            if self.divisor != 1:
                mine.div_(self.divisor)
            for i, p in enumerate(b.params):
                if self.zero1 and b.n > 1 and not b.owned(i):
                    p.grad = None
                    continue
                s = b.slot(i)
                p.grad = mine[s.start - base : s.stop - base].view_as(p).to(p.dtype).clone()

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced gradients (call after reduce_gradients)."""
        device = next(self.model.parameters()).device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for b in self.buckets:
            for i, p in enumerate(b.params):
                if b.owned(i) and p.grad is not None:
                    sq += p.grad.detach().float().pow(2).sum()
        if self.mesh.world_group is not None and self.mesh.world_size > 1:
            dist.all_reduce(sq, group=self.mesh.world_group)
        return sq.sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so the global norm is at most max_norm (as torch's clip_grad_norm_)."""
        norm = self.grad_norm()
        if max_norm > 0 and math.isfinite(norm.item()):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        return norm

    @torch.no_grad()
    def step(self) -> None:
        """optimizer.step() on the owned parameters, then all-gather them (zero1)."""
        if self.optimizer is None:
            raise ValueError("DataParallel.step() needs the optimizer passed at construction")
        self.optimizer.step()
        if not self.zero1:
            return
        for b in self.buckets:
            if b.n == 1 or not b.params:
                continue
            mine = torch.zeros(b.seg, dtype=torch.float32, device=b.params[0].device)
            for i, p in enumerate(b.params):
                if b.owned(i):
                    mine[b.local(i)] = p.detach().reshape(-1).float()
            full = torch.empty(b.n * b.seg, dtype=torch.float32, device=mine.device)
            _all_gather(full, mine, b.group)
            for i, p in enumerate(b.params):
                if not b.owned(i):
                    p.data.copy_(full[b.slot(i)].view_as(p))

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ helpers
    def mean(self, value: torch.Tensor | float) -> float:
        """Average a per-rank scalar (e.g. the local loss) over the data-parallel ranks."""
        device = next(self.model.parameters()).device  # NCCL reduces device tensors only
        t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).to(device, copy=True)
        if group_size(self.mesh.data_group) > 1:
            dist.all_reduce(t, group=self.mesh.data_group)
        return t.item() / self.mesh.data_size

    def owned_fraction(self) -> float:
        """Share of the parameters whose optimizer state this rank holds (1/(dp*ep) for dense with zero1)."""
        total = owned = 0
        for b in self.buckets:
            for i, p in enumerate(b.params):
                total += p.numel()
                owned += p.numel() if (not self.zero1 or b.n == 1 or b.owned(i)) else 0
        return owned / max(total, 1)


class ShardedOptimizer:
    """The optimizer as a training loop sees it under DataParallel: param_groups (learning-rate
    schedules), state_dict/load_state_dict (this rank's shard), zero_grad, and step() = the owned
    parameters' update followed by the all-gather (zero1)."""

    def __init__(self, dp: DataParallel):
        if dp.optimizer is None:
            raise ValueError("ShardedOptimizer needs a DataParallel built with an optimizer")
        self.dp = dp
        self.inner = dp.optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def step(self) -> None:
        self.dp.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dp.model.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
