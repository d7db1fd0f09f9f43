"""Redundant-expert placement (expert-parallel load balancing, EPLB).

Under expert parallelism a GPU is as slow as the tokens its experts receive, so one hot expert makes its
GPU the straggler of every all-to-all. DeepSeek-V3's deployment (REFERENCE.md) duplicates high-load
experts onto extra physical slots and recomputes the placement periodically from the observed load
(`dsv3.inference.expert_load`). Per layer, given the load [E] of the E logical experts, `rebalance` fills
R >= E physical slots, R / G per GPU on G GPUs:

hierarchical policy (num_groups % num_nodes == 0: expert groups fall evenly on nodes)
  1. pack the expert groups onto nodes, the same number per node, balancing group load: with
     group-limited routing a token then reaches few nodes, and inter-node traffic stays bounded;
  2. inside each node, replicate its experts into the node's R / N slots: one replica each, then
     repeatedly give another replica to the expert with the highest load per replica;
  3. pack the node's replicas (load / replica count each, since tokens are spread evenly over replicas,
     see `choose_replicas`) onto the node's GPUs, the same number per GPU.
global policy (otherwise): steps 2-3 over the whole cluster as one node.

Balanced packing is greedy longest-processing-time: items by load descending, each to the least-loaded bin
that still has room. Two replicas of one expert on the same GPU waste a slot (together they carry exactly
what one would), so the replicas are also packed avoiding GPUs that already hold their expert (whenever
another GPU with room exists), and that packing is kept unless its heaviest GPU is heavier than plain
greedy's. Every step is vectorised over layers (a Python loop over slots, none over layers) and
deterministic (stable sorts, lowest index wins ties): ranks that hold the same all-reduced load compute
the same placement without exchanging it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Placement:
    """Physical expert slots of every MoE layer; slot r lives on GPU r // experts_per_gpu.

    physical_to_logical [L, R]: the logical expert held by each slot;
    logical_to_physical [L, E, max_replicas]: the slots of each expert, ascending, padded with -1;
    replica_count [L, E]: the number of slots of each expert (>= 1)."""

    physical_to_logical: torch.Tensor
    logical_to_physical: torch.Tensor
    replica_count: torch.Tensor
    num_gpus: int

    def __post_init__(self) -> None:
        p2l, l2p, cnt = self.physical_to_logical, self.logical_to_physical, self.replica_count
        if p2l.dim() != 2 or l2p.dim() != 3 or cnt.dim() != 2:
            raise ValueError("placement maps must be [L, R], [L, E, max_replicas] and [L, E]")
        L, R = p2l.shape
        E = l2p.shape[1]
        if l2p.shape[0] != L or cnt.shape != (L, E):
            raise ValueError(
                f"placement maps disagree: {list(p2l.shape)}, {list(l2p.shape)}, {list(cnt.shape)}"
            )
        if self.num_gpus < 1 or R % self.num_gpus:
            raise ValueError(f"{R} physical experts do not split evenly over {self.num_gpus} GPUs")
        if ((p2l < 0) | (p2l >= E)).any():
            raise ValueError("physical_to_logical holds an expert id outside [0, E)")
        if not torch.equal(_bincount_rows(p2l, E), cnt.long()):
            raise ValueError("replica_count does not match physical_to_logical")
        if (cnt < 1).any():
            raise ValueError("every logical expert needs at least one replica")
        dev = p2l.device
        valid = torch.arange(l2p.shape[2], device=dev) < cnt.unsqueeze(-1)  # [L, E, M]
        if ((l2p >= 0) != valid).any() or (l2p >= R).any():
            raise ValueError("logical_to_physical padding does not match replica_count")
        held = p2l.gather(1, l2p.clamp(min=0).view(L, -1)).view_as(l2p)
        if (held != torch.arange(E, device=dev).view(1, E, 1))[valid].any():
            raise ValueError("logical_to_physical and physical_to_logical are not inverse")

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logical_to_physical.shape[1]

    @property
    def num_replicas(self) -> int:
        """Physical expert slots per layer (R)."""
        return self.physical_to_logical.shape[1]

    @property
    def experts_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    def gpu_load(self, load: torch.Tensor) -> torch.Tensor:
        """Expected load per GPU [L, G] when each expert's load [L, E] is spread evenly over its replicas."""
        load = _check_load(load, self.num_experts)
        if load.shape[0] != self.num_layers:
            raise ValueError(f"load has {load.shape[0]} layers, the placement {self.num_layers}")
        per_replica = load / self.replica_count.cpu().double()
        slot_load = per_replica.gather(1, self.physical_to_logical.cpu())  # [L, R]
        return slot_load.view(self.num_layers, self.num_gpus, self.experts_per_gpu).sum(-1)

    def imbalance(self, load: torch.Tensor) -> torch.Tensor:
        """max / mean GPU load per layer [L] (1.0 = perfect; a layer with no load counts as 1.0)."""
        g = self.gpu_load(load)
        mean = g.mean(-1)
        return torch.where(mean > 0, g.amax(-1) / mean.clamp(min=1e-300), torch.ones_like(mean))


def identity_placement(num_layers: int, num_experts: int, num_gpus: int) -> Placement:
    """No redundancy: expert e on GPU e // (E / G), the static layout of plain expert parallelism."""
    _check_positive(num_layers=num_layers, num_experts=num_experts, num_gpus=num_gpus)
    if num_experts % num_gpus:
        raise ValueError(f"num_experts={num_experts} is not divisible by num_gpus={num_gpus}")
    return _placement(torch.arange(num_experts).repeat(num_layers, 1), num_experts, num_gpus)


def rebalance(
    load: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Placement:
    """Redundant placement of E logical experts on num_replicas physical slots per layer (see module doc).

    load [L, E] (or [E]) tokens per expert; num_groups expert groups (consecutive experts, the routing
    groups n_group); num_nodes nodes of num_gpus / num_nodes GPUs each."""
    _check_positive(num_replicas=num_replicas, num_groups=num_groups, num_nodes=num_nodes, num_gpus=num_gpus)
    if isinstance(load, torch.Tensor) and load.dim() == 1:
        load = load.unsqueeze(0)
    load = _check_load(load)
    E = load.shape[1]
    if num_replicas < E:
        raise ValueError(f"num_replicas={num_replicas} < num_experts={E}: every expert needs a replica")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} is not divisible by num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} is not divisible by num_nodes={num_nodes}")
    if E % num_groups:
        raise ValueError(f"num_experts={E} is not divisible by num_groups={num_groups}")
    if num_groups % num_nodes:
        num_groups = num_nodes = 1  # global policy: the cluster as one node holding one group
    p2l = _hierarchical(load, num_replicas, num_groups, num_nodes, num_gpus)
    return _placement(p2l, E, num_gpus)


def choose_replicas(
    expert_ids: torch.Tensor,
    logical_to_physical: torch.Tensor,
    replica_count: torch.Tensor,
    offset: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Physical slot for every routed (token, k) pair of one layer: expert_ids [N, K] -> [N, K].

    The j-th pair routed to expert e (row-major order) goes to replica (j + offset) % replica_count[e], so
    an expert's replicas receive counts that differ by at most one. Vary `offset` between batches or
    ranks (a step counter, the rank) so the remainders do not always fall on replica 0.
    logical_to_physical [E, max_replicas] and replica_count [E] are one layer's rows of a Placement."""
    if logical_to_physical.dim() != 2 or replica_count.shape != logical_to_physical.shape[:1]:
        raise ValueError("expected one layer's maps: logical_to_physical [E, M] and replica_count [E]")
    E = replica_count.shape[0]
    flat = expert_ids.reshape(-1).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= E):
        raise ValueError(f"expert ids must lie in [0, {E})")
    cnt = replica_count.to(flat.device).long()
    if (cnt < 1).any():
        raise ValueError("every logical expert needs at least one replica")
    order = flat.argsort(stable=True)
    per_expert = torch.bincount(flat, minlength=E)
    start = per_expert.cumsum(0) - per_expert
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), device=flat.device) - start[flat[order]]
    replica = (rank + torch.as_tensor(offset, device=flat.device).long()) % cnt[flat]
    return logical_to_physical.to(flat.device)[flat, replica].view(expert_ids.shape)


# --------------------------------------------------------------------------- policy steps
def _hierarchical(load: torch.Tensor, R: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """load [L, E] float64 -> physical_to_logical [L, R] (node-major, then GPU-major slot order)."""
    L, E = load.shape
    group_size = E // num_groups
    experts_per_node = E // num_nodes
    slots_per_node = R // num_nodes
    gpus_per_node = num_gpus // num_nodes
    # 1. groups -> nodes. mlog ("node-local logical") = node * experts_per_node + position on that node
    group_node, group_pos = balanced_packing(load.view(L, num_groups, group_size).sum(-1), num_nodes)
    group_first = (group_node * (num_groups // num_nodes) + group_pos) * group_size  # [L, groups]
    log2mlog = (group_first.unsqueeze(-1) + torch.arange(group_size)).view(L, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicate inside each node: rows = (layer, node)
    node_load = load.gather(1, mlog2log).view(L * num_nodes, experts_per_node)
    phy2mlog, count = replicate(node_load, slots_per_node)  # [L N, slots_per_node], [L N, experts_per_node]
    # 3. replicas -> the node's GPUs
    replica_load = (node_load / count).gather(1, phy2mlog)
    gpu, pos = balanced_packing(replica_load, gpus_per_node, key=phy2mlog)
    plain_gpu, plain_pos = balanced_packing(replica_load, gpus_per_node)
    worse = _max_bin_load(replica_load, gpu, gpus_per_node) > _max_bin_load(
        replica_load, plain_gpu, gpus_per_node
    )
    gpu, pos = torch.where(worse, plain_gpu, gpu), torch.where(worse, plain_pos, pos)
    packed = _inverse(gpu * (slots_per_node // gpus_per_node) + pos)  # packed slot -> replica
    packed_mlog = phy2mlog.gather(1, packed).view(L, num_nodes, slots_per_node)
    packed_mlog = packed_mlog + (torch.arange(num_nodes) * experts_per_node).view(1, -1, 1)
    return mlog2log.gather(1, packed_mlog.view(L, R))


def replicate(load: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """load [rows, n] -> (slot_to_expert [rows, num_slots], replica_count [rows, n]).

    One replica per expert, then each extra slot to the expert with the highest load per replica (ties:
    fewer replicas, then the lower index, so zero-load experts share extra slots round-robin)."""
    rows, n = load.shape
    count = torch.ones(rows, n, dtype=torch.long)
    slot_to_expert = torch.cat(
        [torch.arange(n).repeat(rows, 1), torch.empty(rows, num_slots - n, dtype=torch.long)], 1
    )
    r = torch.arange(rows)
    for s in range(n, num_slots):
        per_replica = load / count
        best = per_replica == per_replica.amax(-1, keepdim=True)
        pick = count.masked_fill(~best, num_slots + 1).argmin(-1)  # among the best: fewest replicas
        slot_to_expert[:, s] = pick
        count[r, pick] += 1
    return slot_to_expert, count


def balanced_packing(
    weight: torch.Tensor, num_bins: int, key: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [rows, n] -> (bin [rows, n], position in bin [rows, n]), n / num_bins items per bin.

    Items by weight descending, each to the least-loaded bin with room; with key [rows, n] (ints), an item
    avoids bins already holding an item of the same key while a bin with room and without it exists
    (items of equal weight are taken key by key, which makes that possible more often)."""
    rows, n = weight.shape
    if n % num_bins:
        raise ValueError(f"{n} items do not pack evenly into {num_bins} bins")
    capacity = n // num_bins
    order = torch.arange(n).expand(rows, n)
    if key is not None:  # equal weights: same-key items next to each other, so they spread over bins
        order = key.argsort(dim=-1, stable=True)
    order = order.gather(1, weight.gather(1, order).argsort(dim=-1, descending=True, stable=True))
    bin_load = torch.zeros(rows, num_bins, dtype=torch.float64)
    bin_size = torch.zeros(rows, num_bins, dtype=torch.long)
    bins = torch.empty(rows, n, dtype=torch.long)
    pos = torch.empty(rows, n, dtype=torch.long)
    holds = torch.zeros(rows, num_bins, int(key.max()) + 1 if key is not None else 0, dtype=torch.bool)
    r = torch.arange(rows)
    for i in range(n):
        item = order[:, i]
        cost = bin_load.masked_fill(bin_size >= capacity, float("inf"))
        if key is not None:
            k = key[r, item]
            clash = holds[r, :, k]  # [rows, bins]
            open_no_clash = (bin_size < capacity) & ~clash
            cost = torch.where(
                open_no_clash.any(-1, keepdim=True), cost.masked_fill(clash, float("inf")), cost
            )
        b = cost.argmin(-1)
        bins[r, item] = b
        pos[r, item] = bin_size[r, b]
        bin_load[r, b] += weight[r, item].double()
        bin_size[r, b] += 1
        if key is not None:
            holds[r, b, k] = True
    return bins, pos


# --------------------------------------------------------------------------- helpers
def _placement(p2l: torch.Tensor, E: int, num_gpus: int) -> Placement:
    """Build the inverse maps from physical_to_logical [L, R]."""
    L, R = p2l.shape
    count = _bincount_rows(p2l, E)
    M = int(count.max())
    order = p2l.argsort(dim=-1, stable=True)  # slots grouped by expert, ascending within an expert
    expert = p2l.gather(1, order)
    start = count.cumsum(-1) - count
    rank = torch.arange(R).expand(L, R) - start.gather(1, expert)
    l2p = torch.full((L, E * M), -1, dtype=torch.long)
    l2p.scatter_(1, expert * M + rank, order)
    return Placement(p2l.contiguous(), l2p.view(L, E, M), count, num_gpus)


def _max_bin_load(weight: torch.Tensor, bins: torch.Tensor, num_bins: int) -> torch.Tensor:
    """weight, bins [rows, n] -> the heaviest bin's load per row [rows, 1]."""
    load = torch.zeros(weight.shape[0], num_bins, dtype=torch.float64).scatter_add_(1, bins, weight.double())
    return load.amax(-1, keepdim=True)


def _bincount_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    ones = torch.ones_like(x, dtype=torch.long)
    return torch.zeros(x.shape[0], n, dtype=torch.long, device=x.device).scatter_add_(1, x.long(), ones)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of permutations [rows, n]."""
    inv = torch.empty_like(perm)
    return inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm).contiguous())


def _check_load(load: torch.Tensor, num_experts: int | None = None) -> torch.Tensor:
    if not isinstance(load, torch.Tensor) or load.dim() != 2:
        raise ValueError("load must be a [num_layers, num_experts] tensor")
    if load.shape[0] < 1 or load.shape[1] < 1:
        raise ValueError(f"load must be non-empty, got shape {list(load.shape)}")
    if num_experts is not None and load.shape[1] != num_experts:
        raise ValueError(f"load has {load.shape[1]} experts, the placement {num_experts}")
    load = load.detach().to("cpu", torch.float64)
    if not torch.isfinite(load).all() or (load < 0).any():
        raise ValueError("load must be finite and non-negative")
    return load


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
