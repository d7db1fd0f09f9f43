"""Expert parallelism: routed experts sharded over EP ranks, tokens moved by all-to-all.

`ExpertParallelMoE(moe, mesh)` replaces a built model's `MoE` module from outside (the model code does
not change). Rank r of the EP group holds experts [r L, (r + 1) L), L = n_routed_experts / ep, so the
experts of one simulated node are contiguous. One forward, per MoE layer:

1. route: gate affinities as in the single-device model; with `node_limit` M, each token first keeps
   the M nodes whose experts have the largest sum of top-2 biased affinities (the paper phrases it as
   the top K/M, which is 2 for V3's K=8, M=4; noaux_tc scores groups the same way), then the usual
   group-limited top-k runs inside them;
2. dispatch: each token is sent once to every EP rank that holds at least one of its experts (pairs
   sorted by destination rank), together with its local expert ids and gate weights. The counts go
   first (a small all-to-all), then uneven `all_to_all_single`s started asynchronously; the shared
   expert runs while they are in flight and we wait only after it;
3. the receiving rank sorts the (token, expert) rows by local expert and runs them as grouped GEMMs
   (`GroupedExperts.forward_sorted`), multiplies by the gate weights and sums each token's experts;
4. combine: the reverse all-to-all returns one row per (token, rank) pair, summed into the token.

Autograd flows through both exchanges (dispatch and combine are single autograd nodes whose backward is
the reverse exchange, so every rank issues its backward collectives in the same, data-dependent order).
No token is dropped. Optional low-precision communication as in the paper: FP8 dispatch (E4M3, 1x128
scales; see comm.py) and BF16 combine.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from dsv3.model.moe import Gate, GroupedExperts, MoE, RouterStats, balance_losses
from dsv3.parallel.comm import Pending, _exchange, all_to_all, dequantize_rows_fp8, quantize_rows_fp8
from dsv3.parallel.mesh import Mesh, group_size


# --------------------------------------------------------------------------- routing
def node_mask(scores_biased: torch.Tensor, nodes: int, node_limit: int) -> torch.Tensor:
    """[N, E] biased affinities -> [N, nodes] bool: the node_limit nodes with the best top-2 sums."""
    N, E = scores_biased.shape
    per_node = E // nodes
    node_scores = scores_biased.view(N, nodes, per_node).topk(min(2, per_node), dim=-1).values.sum(-1)
    keep = node_scores.topk(node_limit, dim=-1).indices
    return torch.zeros(N, nodes, dtype=torch.bool, device=scores_biased.device).scatter_(1, keep, True)


def route(
    gate: Gate, scores: torch.Tensor, nodes: int = 1, node_limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate selection with optional node-limited routing: scores [N, E] -> weights, indices [N, K].

    Without a limit (or M >= nodes) this is exactly `gate.select(scores)`. With group-limited routing the
    router's groups must nest inside nodes (V3: groups = nodes) and the node choice is passed as
    Gate.select's group_mask; without groups the experts of the excluded nodes are masked out of the
    affinities before the top-k."""
    E = scores.shape[1]
    if node_limit is None or node_limit >= nodes:
        return gate.select(scores)
    if E % nodes:
        raise ValueError(f"n_routed_experts={E} is not divisible by nodes={nodes}")
    bias = gate.e_score_correction_bias
    mask = node_mask(scores if bias is None else scores + bias, nodes, node_limit)
    G = gate.n_group
    if G > 1 and gate.topk_method != "greedy":
        if G % nodes:
            raise ValueError(f"node-limited routing needs n_group={G} to be a multiple of nodes={nodes}")
        return gate.select(scores, mask.repeat_interleave(G // nodes, dim=1))
    allowed = mask.repeat_interleave(E // nodes, dim=1)
    return gate.select(scores.masked_fill(~allowed, float("-inf")))


def shard_experts(full: GroupedExperts, start: int, n: int) -> GroupedExperts:
    """Experts [start, start + n) as a module of the same class and settings (FP8 experts stay FP8)."""
    local = type(full).__new__(type(full))
    nn.Module.__init__(local)
    local.__dict__.update({k: v for k, v in vars(full).items() if not k.startswith("_")})
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            src = getattr(full, name)
            shard = src[start : start + n].detach().clone()
            setattr(local, name, nn.Parameter(shard, requires_grad=src.requires_grad))
    local.n_experts = n
    return local


# --------------------------------------------------------------------------- dispatch autograd node
class _DispatchGrad(torch.autograd.Function):
    """Connects the received rows to the sent ones. Forward: the (already exchanged) received buffers,
    dequantised if FP8. Backward: reverse exchanges of both gradients, always in the same order."""

    @staticmethod
    def forward(ctx, x_pairs, w_pairs, x_raw, w_raw, splits, grad_group, grad_dtype, fp8_dim):  # type: ignore[override]
        ctx.splits, ctx.group, ctx.grad_dtype = splits, grad_group, grad_dtype
        ctx.x_dtype, ctx.w_dtype = x_pairs.dtype, w_pairs.dtype
        x_recv = dequantize_rows_fp8(x_raw, fp8_dim, x_pairs.dtype) if fp8_dim else x_raw.to(x_pairs.dtype)
        return x_recv, w_raw.clone()

    @staticmethod
    def backward(ctx, gx, gw):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        gx = _exchange(gx.to(ctx.grad_dtype or ctx.x_dtype), in_splits, out_splits, ctx.group, None)
        gw = _exchange(gw.contiguous(), in_splits, out_splits, ctx.group, None)
        return gx.to(ctx.x_dtype), gw.to(ctx.w_dtype), None, None, None, None, None, None


class ExpertParallelMoE(MoE):
    """A MoE layer whose routed experts are sharded over `mesh.ep_group` (drop-in for `MoE`).

    State-dict names are the MoE's (gate.*, experts.w1/w2/w3, shared_experts.*); experts.* hold only this
    rank's L experts, global ids [ep_rank L, (ep_rank + 1) L)."""

    def __init__(self, moe: MoE, mesh: Mesh):
        nn.Module.__init__(self)  # a MoE, built from an existing one (not from a config)
        pc = mesh.config
        E = moe.n_routed_experts
        if E % pc.ep:
            raise ValueError(f"n_routed_experts={E} is not divisible by ep={pc.ep}")
        L = E // pc.ep
        self.n_routed_experts = E
        self.n_local = L
        self.ep_size = pc.ep
        self.ep_rank = mesh.ep_rank
        self.group = mesh.ep_group
        # the backward's exchanges on their own communicator (see `threaded_overlap`)
        self.grad_group = mesh.ep_grad_group if mesh.ep_grad_group is not None else mesh.ep_group
        self.nodes = pc.nodes
        self.node_limit = pc.node_limit
        self.fp8_dispatch = pc.fp8_dispatch
        self.comm_dtype = torch.bfloat16 if pc.bf16_combine else None
        self.overlap_shared = pc.overlap_shared
        if group_size(self.group) != self.ep_size:
            raise ValueError(
                f"the mesh's EP group has {group_size(self.group)} ranks, expected ep={self.ep_size}"
            )
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts
        self.experts = shard_experts(moe.experts, self.ep_rank * L, L)
        self.record_timings = False
        self.timings: dict[str, float] = {}
        self.last_load: dict[str, torch.Tensor] = {}

    @property
    def expert_range(self) -> tuple[int, int]:
        """Global ids [start, stop) of the experts this rank holds."""
        return self.ep_rank * self.n_local, (self.ep_rank + 1) * self.n_local

    def extra_repr(self) -> str:
        lo, hi = self.expert_range
        return (
            f"experts {lo}..{hi - 1} of {self.n_routed_experts} (ep {self.ep_rank}/{self.ep_size}), "
            f"nodes={self.nodes}, node_limit={self.node_limit}, fp8_dispatch={self.fp8_dispatch}, "
            f"comm_dtype={self.comm_dtype}"
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        B, T, D = x.shape
        x = x.reshape(-1, D)
        scores = self.gate.scores(x)
        weights, indices = route(self.gate, scores, self.nodes, self.node_limit)
        y, shared = self.dispatch_combine(x, weights, indices)
        if shared is not None:
            y = y + shared
        counts = torch.bincount(indices.reshape(-1), minlength=self.n_routed_experts).float()
        if torch.is_grad_enabled():
            seq, aux = balance_losses(scores, indices, B)
        else:
            seq = aux = scores.new_zeros(())
        return y.view(B, T, D), RouterStats.of(counts, seq, aux)

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.shared_experts is None else self.shared_experts(x)

    def dispatch_combine(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [N, D], gate weights/indices [N, K] -> (routed output [N, D], shared-expert output or None)."""
        N, D = x.shape
        L, ep, group = self.n_local, self.ep_size, self.group
        clock = time.perf_counter
        # pairs (token, destination rank), sorted by rank then token
        dest = indices // L  # [N, K]
        hit = torch.zeros(N, ep, dtype=torch.bool, device=x.device).scatter_(1, dest, True)
        pair_r, pair_t = hit.t().nonzero(as_tuple=True)
        send = hit.sum(0)  # [ep] rows to each rank
        on_r = dest[pair_t] == pair_r.unsqueeze(1)  # [P, K] choice k of the pair's token lives on its rank
        local_ids = torch.where(on_r, indices[pair_t] - pair_r.unsqueeze(1) * L, -1).to(torch.int32)
        w_pairs = torch.where(on_r, weights[pair_t], torch.zeros((), dtype=weights.dtype, device=x.device))
        x_pairs = x[pair_t]
        # counts first (small, synchronous), then the payload asynchronously
        recv = _exchange(send, [1] * ep, [1] * ep, group, None) if ep > 1 else send
        in_splits, out_splits = send.tolist(), recv.tolist()
        splits = (out_splits, in_splits)
        pending = Pending() if self.overlap_shared else None
        t0 = clock()
        with torch.no_grad():
            payload = quantize_rows_fp8(x_pairs) if self.fp8_dispatch else x_pairs.detach()
            if ep > 1:
                x_raw = _exchange(payload, out_splits, in_splits, group, pending)
                w_raw = _exchange(w_pairs.detach(), out_splits, in_splits, group, pending)
                ids = _exchange(local_ids, out_splits, in_splits, group, pending)
            else:
                x_raw, w_raw, ids = payload, w_pairs.detach(), local_ids
        t1 = clock()
        shared = self._shared(x)
        t2 = clock()
        if pending is not None:
            pending.wait()
        t3 = clock()
        if self.record_timings:
            self.timings = {"dispatch_issue_s": t1 - t0, "shared_s": t2 - t1, "dispatch_wait_s": t3 - t2}
        grad_dtype = self.comm_dtype
        x_recv, w_recv = _DispatchGrad.apply(
            x_pairs, w_pairs, x_raw, w_raw, splits, self.grad_group, grad_dtype, D if self.fp8_dispatch else 0
        )
        # local experts: (row, choice) pairs sorted by local expert, grouped GEMMs, weighted sum per row
        valid = ids >= 0
        row, slot = valid.nonzero(as_tuple=True)
        e = ids[row, slot].long()
        order = e.argsort(stable=True)
        row, slot, e = row[order], slot[order], e[order]
        counts = torch.bincount(e, minlength=L)
        out = self.experts.forward_sorted(x_recv[row], counts)
        out = out * w_recv[row, slot].unsqueeze(-1).to(out.dtype)
        y_recv = torch.zeros(x_recv.shape[0], D, dtype=out.dtype, device=x.device).index_add_(0, row, out)
        self.last_load = {"sent_rows": send.detach(), "recv_rows": recv.detach(), "local_expert_rows": counts}
        # combine: back to the source ranks, one row per pair, summed per token
        if ep > 1:
            y_pairs = all_to_all(
                y_recv, in_splits, out_splits, group, wire_dtype=self.comm_dtype, grad_group=self.grad_group
            )
        else:
            y_pairs = y_recv
        y = torch.zeros(N, D, dtype=x.dtype, device=x.device).index_add_(0, pair_t, y_pairs.to(x.dtype))
        if not self.overlap_shared:
            shared = self._shared(x) if shared is None else shared
        return y, shared


# --------------------------------------------------------------------------- statistics
def ep_moe_layers(model: nn.Module) -> list[ExpertParallelMoE]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]


def global_expert_counts(router_stats: list[RouterStats], mesh: Mesh) -> torch.Tensor:
    """Per-layer per-expert token counts summed over every data-parallel rank: [layers, E] (float).

    All ranks get the same tensor, so the aux-loss-free bias update keeps the biases identical."""
    if not router_stats:
        return torch.zeros(0, 0)
    counts = torch.stack([s.counts.detach().float() for s in router_stats])
    if group_size(mesh.data_group) > 1:
        import torch.distributed as dist

        dist.all_reduce(counts, group=mesh.data_group)
    return counts


def load_report(counts: torch.Tensor, mesh: Mesh) -> dict[str, Any]:
    """Per-expert counts [layers, E] -> per-EP-rank and per-node loads and MaxVio (max/mean - 1)."""
    layers, E = counts.shape
    per_rank = counts.view(layers, mesh.ep, E // mesh.ep).sum(-1)
    per_node = per_rank.view(layers, mesh.nodes, -1).sum(-1)
    mean = counts.mean(-1, keepdim=True).clamp_min(1e-9)
    return {
        "per_expert": counts,
        "per_rank": per_rank,
        "per_node": per_node,
        "max_vio": (counts.amax(-1, keepdim=True) / mean - 1).squeeze(-1),
        "rank_max_vio": (per_rank.amax(-1) / per_rank.mean(-1).clamp_min(1e-9) - 1),
    }
