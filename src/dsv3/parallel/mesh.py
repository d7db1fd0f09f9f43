"""The `Mesh` of process groups built from a parallel layout (`dsv3.config.ParallelConfig`).

Layout (DeepSeek-V3 trains with PP16 x EP64 x ZeRO-1 DP, no tensor parallelism). The world is
pp x dp x ep ranks, rank = (pp_rank * dp + dp_rank) * ep + ep_rank, so the EP ranks of one expert shard
set are neighbours (on a real cluster: the GPUs of one or a few nodes) and pipeline stages are outermost.

- Every rank of one pipeline stage consumes its own slice of the batch: the data-parallel width of the
  dense (attention, router, shared-expert, embedding) parameters is dp * ep (`data_group`).
- Routed experts are sharded over the `ep_group` (each rank holds n_routed_experts / ep of them) and
  replicated over the `dp_group`: an expert's gradient is reduced only across the dp ranks that hold it.
- The EP group is split into `nodes` contiguous "nodes" of ep / nodes ranks each (a notion, so that one
  machine can simulate several nodes): experts are placed node by node, and node-limited routing sends
  each token to at most `node_limit` (M) of them.

Groups live in the Mesh object that callers pass around; nothing is stored in module globals, so two
meshes (e.g. a draft and a target model) can coexist in one process.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from dsv3.config import ParallelConfig

__all__ = ["Mesh", "ParallelConfig", "build_mesh", "group_size", "rank_of"]


@dataclass
class Mesh:
    """This rank's coordinates and its process groups (None = the group of this rank alone)."""

    config: ParallelConfig
    rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    ep_group: Any = None  # ranks sharing one token exchange (hold disjoint experts)
    ep_grad_group: Any = None  # the same ranks, a second communicator: the backward's exchanges
    dp_group: Any = None  # replicas of this rank's expert shard
    data_group: Any = None  # all dp * ep ranks of this pipeline stage (dense gradients)
    pp_group: Any = None  # one rank per stage: the pipeline
    world_group: Any = None  # every rank (global gradient norm, barriers)

    @property
    def ep(self) -> int:
        return self.config.ep

    @property
    def dp(self) -> int:
        return self.config.dp

    @property
    def pp(self) -> int:
        return self.config.pp

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def data_rank(self) -> int:
        """Index of this rank's batch slice among the dp * ep ranks of its stage."""
        return self.dp_rank * self.ep + self.ep_rank

    @property
    def data_size(self) -> int:
        return self.config.data_parallel_size

    @property
    def nodes(self) -> int:
        return self.config.nodes

    @property
    def ranks_per_node(self) -> int:
        return self.ep // self.nodes

    @property
    def node(self) -> int:
        """The simulated node (within the EP group) this rank belongs to."""
        return self.ep_rank // self.ranks_per_node

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls, config: ParallelConfig | None = None) -> Mesh:
        """A one-process mesh (no collectives). With ep > 1 it is only valid for planning/inspection."""
        config = config or ParallelConfig()
        return cls(config=dataclasses.replace(config, dp=config.dp or 1).validate())

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: pp {self.pp_rank}/{self.pp} dp {self.dp_rank}/{self.dp} "
            f"ep {self.ep_rank}/{self.ep} node {self.node}/{self.nodes}"
        )


def rank_of(config: ParallelConfig, pp_rank: int, dp_rank: int, ep_rank: int) -> int:
    return (pp_rank * config.dp + dp_rank) * config.ep + ep_rank


def build_mesh(config: ParallelConfig) -> Mesh:
    """Create every process group of the layout. Call on all ranks, after `init_process_group`.

    `new_group` is collective: every rank creates every group, in the same order, and keeps its own."""
    config.validate()
    if not dist.is_available() or not dist.is_initialized():
        if config.world_size == 1:
            return Mesh.single(config)
        raise ValueError(
            f"the layout needs {config.world_size} processes but torch.distributed is not initialised "
            "(launch with `dsv3 train --nproc N` or torchrun)"
        )
    world = dist.get_world_size()
    if config.dp is None:  # the data-parallel width the world leaves
        config = dataclasses.replace(config, dp=max(world // (config.pp * config.ep), 1))
    if world != config.world_size:
        raise ValueError(
            f"world size {world} does not match the parallel layout pp={config.pp} x dp={config.dp} "
            f"x ep={config.ep} = {config.world_size}"
        )
    rank = dist.get_rank()
    pp_rank, rest = divmod(rank, config.dp * config.ep)
    dp_rank, ep_rank = divmod(rest, config.ep)
    timeout = datetime.timedelta(seconds=config.timeout_s)
    mesh = Mesh(config=config, rank=rank, pp_rank=pp_rank, dp_rank=dp_rank, ep_rank=ep_rank)
    P, D, E = config.pp, config.dp, config.ep

    def make(ranks: list[int]) -> Any:
        return dist.new_group(ranks, timeout=timeout)

    for p in range(P):
        for d in range(D):
            ranks = [rank_of(config, p, d, e) for e in range(E)]
            g, g_grad = make(ranks), make(ranks) if E > 1 else None
            if (p, d) == (pp_rank, dp_rank):
                mesh.ep_group, mesh.ep_grad_group = g, g_grad
    for p in range(P):
        for e in range(E):
            g = make([rank_of(config, p, d, e) for d in range(D)])
            if (p, e) == (pp_rank, ep_rank):
                mesh.dp_group = g
    for p in range(P):
        g = make([rank_of(config, p, d, e) for d in range(D) for e in range(E)])
        if p == pp_rank:
            mesh.data_group = g
    for d in range(D):
        for e in range(E):
            g = make([rank_of(config, p, d, e) for p in range(P)])
            if (d, e) == (dp_rank, ep_rank):
                mesh.pp_group = g
    mesh.world_group = dist.group.WORLD
    return mesh


def group_size(group: Any) -> int:
    """Ranks in a group; a None group (single-process mesh) has one."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)
