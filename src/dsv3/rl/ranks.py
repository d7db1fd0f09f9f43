"""GRPO's data parallelism: which rows of a step each rank owns, and the few collectives it needs.

A step's N = prompts x G completions are numbered as in one process (a group's G rows adjacent) and rank
r of W owns the contiguous rows [r N/W, (r+1) N/W), TRL's layout: a group may straddle ranks. Each rank
samples its rows with the single-process seeds, scores them, and the scores are all-gathered, so every
rank computes the advantages of all N rows over the WHOLE group (and `scale_rewards="batch"` over the
whole batch) and keeps its own rows.

Gradients: each rank holds a full policy replica. The loss of a micro-batch is weighted by global counts
(dapo: its active tokens over the active tokens of all ranks; grpo / dr_grpo: its rows over N), so one
rank's backward yields exactly its share of the single-process gradient, and an all-reduce SUM of the
gradients yields the whole of it; every rank then takes the same optimizer step on the same gradient and
the replicas stay equal without a parameter broadcast. A parameter whose gradient is None on every rank
stays None (AdamW skips it, as in one process).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """This process among GRPO's data-parallel ranks; `group` None is a single process."""

    group: Any = None  # a torch.distributed process group (gloo on CPU, NCCL on GPU)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def world(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's rows of a step of n completions (contiguous, n / world each)."""
        return shard_rows(n, self.rank, self.world)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's [n / world, ...] tensor along dim 0, in rank order (on x's device)."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x, device=self.device) for _ in range(self.world)]
        dist.all_gather(parts, x.to(self.device).contiguous(), group=self.group)
        return torch.cat(parts).to(x.device)

    def _reduce(self, values: Sequence[float], op: Any) -> list[float]:
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op, group=self.group)
        return t.tolist()

    def sum(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over the ranks in place (one flat buffer, one all-reduce)."""
        if self.world == 1 or not params:
            return
        ref = params[0]
        has = torch.tensor([float(p.grad is not None) for p in params], dtype=ref.dtype, device=ref.device)
        flat = torch.cat(
            [has] + [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        offset = len(params)
        for i, p in enumerate(params):
            g = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if flat[i] > 0:
                p.grad = g.clone()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Rows [rank n / world, (rank + 1) n / world) of n; n must split evenly."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of {world} ranks")
    if n % world:
        raise ValueError(
            f"prompts_per_step x num_generations = {n} completions do not split over {world} ranks: "
            f"make it a multiple of {world}"
        )
    k = n // world
    return slice(rank * k, (rank + 1) * k)
