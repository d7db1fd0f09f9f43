"""Expert-parallel inference with redundant experts (EPLB), applied from outside to a built model.

Layout (DeepSeek-V3's deployment, REFERENCE.md): every rank of the EP group holds the whole dense part of
the model and runs its own sequences through attention (attention data parallel); the routed experts are
spread over the ranks as R physical slots, R / G per rank, slot r holding a copy of logical expert
`placement.physical_to_logical[layer, r]` (dsv3.inference.eplb). Hot experts own several slots.

One MoE layer, per forward, on every rank:
1. route as the single-device model does (`Gate.select`: same logical experts, same gate values);
2. map each (token, expert) pair to one of the expert's replicas, spread evenly (`choose_replicas`,
   offset by rank and call count), so a hot expert's tokens split over its copies;
3. counts round: a [G, 2] all-to-all carries the rows this rank sends to each rank and a *tag* (the
   MoE layer index, or < 0 when this rank is idle); each token goes once to each rank holding one of its
   chosen replicas, together with [gate weights | local slot ids] (-1 = not for that rank);
4. payload all-to-alls (`all_to_all_single`, uneven splits, started asynchronously: the shared expert
   runs while they are in flight), local grouped GEMMs over the physical slots
   (`GroupedExperts.forward_sorted`), gating, and the combine all-to-all back, summed per token.

Lockstep. Every all-to-all is collective, but ranks have different work (one prefills, another only
decodes, a third has nothing). The counts round is the synchronisation point: a rank that finished its
own forwards calls `sync()`, which keeps answering counts rounds with an idle tag; when some rank is
active with layer l, the idle rank joins layer l's exchanges with zero rows of its own (it still hosts
experts, so it computes the rows others send it); when every rank is idle the round ends, and whether
any rank still has queued work travels in the same round (-2 = idle but busy next step, -1 = done).
So ranks agree without an extra collective and without knowing each other's schedules; two active ranks
in different layers raise a clear error on every rank instead of deadlocking.

Placement swaps (`set_placement`) happen between steps on all ranks at once (every rank must pass the
same placement: compute it from the all-reduced load, `rebalance` is deterministic). The physical slots
are re-gathered either from a full copy of the logical experts kept on the host (`keep_full_experts`:
simple, costs the whole expert memory per rank) or, by default, by one all-to-all per layer from the
ranks that hold the experts under the old placement (a rank that already holds a copy uses it).
Gate, shared experts and attention are replicated and never move. Replicas hold bitwise-equal weights, so
which replica serves a pair does not change the result; greedy outputs equal single-process inference up
to float summation order, which only matters at exact argmax ties.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv3.inference.eplb import Placement, choose_replicas, identity_placement, rebalance
from dsv3.model import Transformer
from dsv3.model.moe import GroupedExperts, MoE, RouterStats, expert_counts
from dsv3.parallel.comm import Pending, all_to_all, dequantize_rows_fp8, quantize_rows_fp8

IDLE_DONE = -1  # counts-round tag: this rank has no forward running and no queued work
IDLE_BUSY = -2  # ... no forward running, but work for the next step


def _group_rank_size(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _local_experts(
    like: GroupedExperts, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> GroupedExperts:
    """A module of like's class and settings (FP8 experts stay FP8) holding the given stacked weights."""
    local = type(like).__new__(type(like))
    nn.Module.__init__(local)
    local.__dict__.update({k: v for k, v in vars(like).items() if not k.startswith("_")})
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        setattr(local, name, nn.Parameter(w.contiguous(), requires_grad=False))
    local.n_experts = w1.shape[0]
    return local


class RedundantExpertMoE(MoE):
    """Drop-in for `MoE` at inference: this rank's physical expert slots of one layer (see module doc).

    `experts` holds slots [rank n, (rank + 1) n) of the placement (n = R / G), `slot_experts` their
    logical ids. RouterStats.counts are the logical counts of this rank's own tokens."""

    def __init__(
        self,
        moe: MoE,
        layer: int,
        group: Any,
        fp8_dispatch: bool = False,
        combine_dtype: torch.dtype | None = None,
    ):
        nn.Module.__init__(self)
        self.n_routed_experts = moe.n_routed_experts
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts
        self.experts = moe.experts  # replaced by `load_slots` before the first forward
        self.layer = layer
        self.group = group
        self.ep_rank, self.ep_size = _group_rank_size(group)
        self.fp8_dispatch = fp8_dispatch
        self.combine_dtype = combine_dtype
        self.n_local = 0
        self.calls = 0  # forwards so far: rotates which replica takes an expert's remainder pair
        self.register_buffer("slot_experts", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("logical_to_physical", torch.zeros(0, 1, dtype=torch.long), persistent=False)
        self.register_buffer("replica_count", torch.zeros(0, dtype=torch.long), persistent=False)
        self.processed = torch.zeros(0, dtype=torch.float64)  # rows computed per local slot (host)
        self.routed = torch.zeros(self.n_routed_experts, dtype=torch.float64)  # this rank's tokens per expert

    def extra_repr(self) -> str:
        lo = self.ep_rank * self.n_local
        return (
            f"layer={self.layer}, slots {lo}..{lo + self.n_local - 1}"
            f" = experts {self.slot_experts.tolist()}, ep {self.ep_rank}/{self.ep_size}, "
            f"fp8_dispatch={self.fp8_dispatch}, combine_dtype={self.combine_dtype}"
        )

    def load_slots(self, placement: Placement, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> None:
        """Install this rank's physical slots of `placement` with their stacked weights [n, ...]."""
        n = placement.experts_per_gpu
        if w1.shape[0] != n:
            raise ValueError(f"layer {self.layer}: got weights for {w1.shape[0]} slots, expected {n}")
        dev = self.gate.weight.device
        lo = self.ep_rank * n
        self.experts = _local_experts(self.experts, w1.to(dev), w2.to(dev), w3.to(dev))
        self.n_local = n
        self.slot_experts = placement.physical_to_logical[self.layer, lo : lo + n].to(dev)
        self.logical_to_physical = placement.logical_to_physical[self.layer].to(dev)
        self.replica_count = placement.replica_count[self.layer].to(dev)
        self.processed = torch.zeros(n, dtype=torch.float64)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        if torch.is_grad_enabled():
            raise ValueError(
                "RedundantExpertMoE is inference-only: run under torch.inference_mode() or torch.no_grad() "
                "(training uses dsv3.parallel.ExpertParallelMoE)"
            )
        B, T, D = x.shape
        x = x.reshape(-1, D)
        N = x.shape[0]
        scores = self.gate.scores(x)
        weights, indices = self.gate.select(scores)
        phys = choose_replicas(
            indices, self.logical_to_physical, self.replica_count, self.calls + self.ep_rank
        )
        self.calls += 1
        n, G = self.n_local, self.ep_size
        dest = phys // n  # [N, K]
        hit = torch.zeros(N, G, dtype=torch.bool, device=x.device).scatter_(1, dest, True)
        pair_r, pair_t = hit.t().nonzero(as_tuple=True)  # (rank, token) pairs sorted by rank
        send = hit.sum(0)
        on_r = dest[pair_t] == pair_r.unsqueeze(1)  # [P, K]: choice k of the pair's token lives on its rank
        slot = torch.where(on_r, phys[pair_t] - pair_r.unsqueeze(1) * n, -1)
        w = torch.where(on_r, weights[pair_t], 0.0)
        meta = torch.cat([w, slot.float()], dim=1)  # [P, 2K] float32: slot ids < 2^24 are exact
        recv = self.counts_round(send, self.layer)
        y_pairs, shared = self.exchange(x[pair_t], meta, send.tolist(), recv, x)
        y = torch.zeros(N, D, dtype=x.dtype, device=x.device).index_add_(0, pair_t, y_pairs.to(x.dtype))
        if shared is not None:
            y = y + shared
        counts = expert_counts(indices.reshape(-1), self.n_routed_experts).float()
        self.routed += counts.cpu().double()
        zero = scores.new_zeros(())
        return y.view(B, T, D), RouterStats.of(counts, zero, zero)

    def counts_round(self, send: torch.Tensor, tag: int) -> list[int]:
        """Rows to each rank + this rank's tag -> rows from each rank; checks that ranks are in lockstep."""
        recv, tags = counts_round(send, tag, self.group, self.ep_size)
        active = tags[tags >= 0]
        if (active != tag).any():
            raise RuntimeError(
                f"expert-parallel ranks out of lockstep: this rank runs MoE layer {tag}, ranks run layers "
                f"{sorted(set(active.tolist()))} in the same round (every rank must run the same forwards; "
                "use ExpertParallelInference.sync between steps)"
            )
        return recv

    def exchange(
        self,
        x_pairs: torch.Tensor,
        meta: torch.Tensor,
        send: list[int],
        recv: list[int],
        x_shared: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dispatch rows, run the local slots, combine. Returns (rows back per sent pair, shared output)."""
        D = x_pairs.shape[1]
        group, pending = self.group, Pending()
        payload = quantize_rows_fp8(x_pairs) if self.fp8_dispatch else x_pairs
        x_raw = all_to_all(payload, recv, send, group, pending)
        meta_recv = all_to_all(meta, recv, send, group, pending)
        shared = None
        if x_shared is not None and self.shared_experts is not None:
            shared = self.shared_experts(x_shared)  # overlaps the dispatch in flight
        pending.wait()
        x_recv = dequantize_rows_fp8(x_raw, D, x_pairs.dtype) if self.fp8_dispatch else x_raw
        y_recv = self._run_slots(x_recv, meta_recv)
        y_pairs = all_to_all(y_recv, send, recv, group, wire_dtype=self.combine_dtype)
        return y_pairs, shared

    def _run_slots(self, x_recv: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """Received rows [P, D] with [weights | slots] [P, 2K] -> gated sum of their local experts [P, D]."""
        K = meta.shape[1] // 2
        w, slots = meta[:, :K], meta[:, K:].long()
        row, k = (slots >= 0).nonzero(as_tuple=True)
        s = slots[row, k]
        order = s.argsort(stable=True)
        row, k, s = row[order], k[order], s[order]
        counts = torch.bincount(s, minlength=self.n_local)
        out = self.experts.forward_sorted(x_recv[row], counts)
        out = out * w[row, k].unsqueeze(-1).to(out.dtype)
        self.processed += counts.cpu().double()
        return torch.zeros(x_recv.shape[0], x_recv.shape[1], dtype=out.dtype, device=out.device).index_add_(
            0, row, out
        )

    def serve_idle(self, recv: list[int], dtype: torch.dtype) -> None:
        """Join this layer's exchanges with no tokens of our own (after a counts round tagged with it)."""
        dev, D, K = self.gate.weight.device, self.gate.weight.shape[1], self.gate.topk
        x = torch.zeros(0, D, dtype=dtype, device=dev)
        meta = torch.zeros(0, 2 * K, dtype=torch.float32, device=dev)
        self.exchange(x, meta, [0] * self.ep_size, recv, None)


def counts_round(send: torch.Tensor, tag: int, group: Any, size: int) -> tuple[list[int], torch.Tensor]:
    """[G] rows to each rank and a tag -> ([G] rows from each rank, [G] tags of every rank)."""
    msg = torch.stack([send.long(), torch.full_like(send, tag, dtype=torch.long)], dim=1)  # [G, 2]
    got = all_to_all(msg, [1] * size, [1] * size, group)
    return got[:, 0].tolist(), got[:, 1].cpu()


class ExpertParallelInference:
    """Handle on a model whose MoE layers were swapped for `RedundantExpertMoE` (see `apply`).

    Call every method on all ranks of the group, in the same order (they hold collectives)."""

    def __init__(
        self,
        model: Transformer,
        group: Any = None,
        placement: Placement | None = None,
        keep_full_experts: bool = False,
        fp8_dispatch: bool = False,
        combine_dtype: torch.dtype | None = None,
    ):
        moes = model.moe_layers()
        if not moes:
            raise ValueError("expert-parallel inference needs a MoE model (it has no MoE layers)")
        if any(isinstance(m, RedundantExpertMoE) for m in moes):
            raise ValueError("the model's MoE layers are already expert-parallel")
        self.model = model
        self.group = group
        self.rank, self.size = _group_rank_size(group)
        self.num_experts = moes[0].n_routed_experts
        self.dtype = model.embed.weight.dtype
        self.device = model.embed.weight.device  # collectives run on it (NCCL needs CUDA tensors)
        full = [(m.experts.w1.detach(), m.experts.w2.detach(), m.experts.w3.detach()) for m in moes]
        self.full_experts = (
            [tuple(w.to("cpu", copy=True) for w in ws) for ws in full] if keep_full_experts else None
        )
        self.layers: list[RedundantExpertMoE] = []
        for i, moe in enumerate(moes):
            ep_moe = RedundantExpertMoE(moe, i, group, fp8_dispatch, combine_dtype)
            _replace_module(model, moe, ep_moe)
            self.layers.append(ep_moe)
        if placement is None:
            placement = default_placement(len(moes), self.num_experts, self.size)
        self._check(placement)
        for layer, (w1, w2, w3) in zip(self.layers, full):
            idx = self._my_slots(placement, layer.layer)
            layer.load_slots(placement, w1[idx], w2[idx], w3[idx])
        self.placement = placement

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _my_slots(self, placement: Placement, layer: int) -> torch.Tensor:
        n = placement.experts_per_gpu
        return placement.physical_to_logical[layer, self.rank * n : (self.rank + 1) * n].cpu()

    def _check(self, placement: Placement) -> None:
        if not isinstance(placement, Placement):
            raise ValueError(f"expected a dsv3.inference.eplb.Placement, got {type(placement).__name__}")
        if placement.num_gpus != self.size:
            raise ValueError(f"the placement is for {placement.num_gpus} GPUs, the EP group has {self.size}")
        if placement.num_layers != self.num_layers:
            raise ValueError(
                f"the placement has {placement.num_layers} layers, the model {self.num_layers} MoE layers"
            )
        if placement.num_experts != self.num_experts:
            raise ValueError(
                f"the placement has {placement.num_experts} experts, the model {self.num_experts}"
            )

    # ------------------------------------------------------------------ placement
    def set_placement(
        self, placement: Placement, full_experts: list[tuple[torch.Tensor, ...]] | None = None
    ) -> None:
        """Swap the redundant placement (between steps, same placement on every rank).

        Weights come from `full_experts` ([(w1, w2, w3)] per MoE layer, logical [E, ...]) when given, else
        from the host copy kept with keep_full_experts, else from the current owners by all-to-all."""
        self._check(placement)
        source = full_experts if full_experts is not None else self.full_experts
        if source is not None and len(source) != self.num_layers:
            raise ValueError(f"full_experts has {len(source)} layers, the model {self.num_layers}")
        with torch.no_grad():
            for layer in self.layers:
                if source is not None:
                    idx = self._my_slots(placement, layer.layer)
                    w1, w2, w3 = (w.index_select(0, idx.to(w.device)) for w in source[layer.layer])
                else:
                    w1, w2, w3 = self._fetch(layer, placement)
                layer.load_slots(placement, w1, w2, w3)
        self.placement = placement

    def _fetch(self, layer: RedundantExpertMoE, new: Placement) -> tuple[torch.Tensor, ...]:
        """This rank's new slots' weights, sent by the ranks holding them under the current placement.

        Source of new slot s (expert e): a copy of e already on s's rank if there is one, else e's old
        replicas in turn (choose_replicas), so several receivers of a hot expert spread over its owners."""
        old, li = self.placement, layer.layer
        n_old, n_new = old.experts_per_gpu, new.experts_per_gpu
        new_p2l = new.physical_to_logical[li].cpu()
        old_p2l = old.physical_to_logical[li].cpu()
        src = choose_replicas(
            new_p2l.view(-1, 1), old.logical_to_physical[li].cpu(), old.replica_count[li].cpu()
        ).view(-1)
        dst_rank = torch.arange(new_p2l.numel()) // n_new
        for s in range(new_p2l.numel()):  # prefer a copy the receiver already holds (no transfer)
            d = int(dst_rank[s])
            mine = (old_p2l[d * n_old : (d + 1) * n_old] == new_p2l[s]).nonzero()
            if mine.numel():
                src[s] = d * n_old + int(mine[0])
        src_rank = src // n_old
        ex = layer.experts
        shapes = [ex.w1.shape[1:], ex.w2.shape[1:], ex.w3.shape[1:]]
        rows_old = torch.cat([w.detach().reshape(w.shape[0], -1) for w in (ex.w1, ex.w2, ex.w3)], dim=1)
        # sender: slots whose source is me, ordered by destination slot (hence by destination rank)
        out_slots = (src_rank == self.rank).nonzero().view(-1)
        send = rows_old[(src[out_slots] - self.rank * n_old).to(rows_old.device)]
        in_splits = torch.bincount(dst_rank[out_slots], minlength=self.size).tolist()
        # receiver: my slots, in (source rank, slot) order
        mine = torch.arange(self.rank * n_new, (self.rank + 1) * n_new)
        order = mine[src_rank[mine].argsort(stable=True)]
        out_splits = torch.bincount(src_rank[mine], minlength=self.size).tolist()
        width = send.shape[1]
        raw = all_to_all(send.contiguous().view(torch.uint8), out_splits, in_splits, self.group)
        got = raw.view(rows_old.dtype).view(-1, width)
        rows_new = torch.empty(n_new, width, dtype=rows_old.dtype, device=rows_old.device)
        rows_new[(order - self.rank * n_new).to(rows_old.device)] = got
        sizes = [shapes[0].numel(), shapes[1].numel(), shapes[2].numel()]
        parts = rows_new.split(sizes, dim=1)
        return tuple(p.reshape(n_new, *shp) for p, shp in zip(parts, shapes))

    def rebalance(
        self, load: torch.Tensor, num_replicas: int, num_groups: int | None = None, num_nodes: int = 1
    ) -> Placement:
        """Sum this rank's load [L, E] over the group, compute the EPLB placement, install it; return it.

        num_groups defaults to the router's n_group (1 = global policy)."""
        total = self.all_reduce(torch.as_tensor(load, dtype=torch.float64).clone())
        groups = num_groups if num_groups is not None else (self.layers[0].gate.n_group or 1)
        placement = rebalance(total, num_replicas, groups, num_nodes, self.size)
        self.set_placement(placement)
        return placement

    # ------------------------------------------------------------------ lockstep and statistics
    def sync(self, has_work: bool = False) -> bool:
        """Serve other ranks' MoE layers until every rank is idle; True if any rank has work queued.

        Call after this rank's forwards of a step (or instead of them when it has none)."""
        tag = IDLE_BUSY if has_work else IDLE_DONE
        zeros = torch.zeros(self.size, dtype=torch.long, device=self.device)
        while True:
            recv, tags = counts_round(zeros, tag, self.group, self.size)
            active = tags[tags >= 0]
            if active.numel() == 0:
                return bool((tags == IDLE_BUSY).any())
            if (active != active[0]).any():
                raise RuntimeError(
                    f"expert-parallel ranks out of lockstep: MoE layers {sorted(set(active.tolist()))} "
                    "run in the same round"
                )
            self.layers[int(active[0])].serve_idle(recv, self.dtype)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the group, on the model's device; returned on t's device (t itself is unchanged
        unless it lives there). A group of one rank returns t."""
        if self.size == 1:
            return t
        on_dev = t.to(self.device)
        dist.all_reduce(on_dev, group=self.group)
        return on_dev.to(t.device)

    def routed_counts(self, reset: bool = True) -> torch.Tensor:
        """This rank's tokens per logical expert [L, E] (float64) since the last reset: for an
        ExpertLoadRecorder (sum over ranks, e.g. with `rebalance`, before placing)."""
        out = torch.stack([m.routed.clone() for m in self.layers])
        if reset:
            for m in self.layers:
                m.routed.zero_()
        return out

    def rank_load(self, reset: bool = True) -> torch.Tensor:
        """Rows each rank's experts computed since the last reset: [L, G] (gathered; every rank gets it).

        This is the measured EP load: max / mean over ranks is the straggler factor of a layer."""
        mine = torch.stack([m.processed.sum() for m in self.layers])  # [L]
        out = torch.zeros(self.size, self.num_layers, dtype=torch.float64)
        out[self.rank] = mine
        out = self.all_reduce(out)
        if reset:
            for m in self.layers:
                m.processed.zero_()
        return out.t().contiguous()


def default_placement(num_layers: int, num_experts: int, num_gpus: int) -> Placement:
    """Identity (expert e on GPU e // (E / G)) when G divides E; else the fewest redundant slots that
    make the experts split evenly (R = E rounded up to a multiple of G), spread by `rebalance` over a
    uniform load, so expert-parallel inference runs on any number of ranks."""
    if num_experts % num_gpus == 0:
        return identity_placement(num_layers, num_experts, num_gpus)
    R = -(-num_experts // num_gpus) * num_gpus
    return rebalance(torch.ones(num_layers, num_experts), R, 1, 1, num_gpus)


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ValueError("MoE module not found in the model")


def apply_ep_inference(
    model: Transformer,
    group: Any = None,
    placement: Placement | None = None,
    keep_full_experts: bool = False,
    fp8_dispatch: bool = False,
    combine_dtype: torch.dtype | None = None,
) -> ExpertParallelInference:
    """Swap every MoE layer (main and MTP) of a built model for its expert-parallel inference version.

    Call on every rank of `group` (default: the world) with identical models; only this rank's physical
    slots stay in the MoE layers (plus a host copy of all experts with keep_full_experts). placement
    defaults to `default_placement` (the identity when the ranks divide the experts). fp8_dispatch /
    combine_dtype: the paper's FP8 dispatch and BF16 combine on the wire (outputs then differ slightly
    from the single-process model)."""
    return ExpertParallelInference(model, group, placement, keep_full_experts, fp8_dispatch, combine_dtype)
