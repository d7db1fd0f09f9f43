"""DeepSeekMoE: router, grouped routed experts and shared experts.

Routing (per token, affinities s over the E routed experts):
- scoring: s = sigmoid(u . e_i) (V3) or softmax over experts (V2);
- selection uses s + b, where b = `e_score_correction_bias` (topk_method noaux_tc). b is a buffer moved
  by the trainer after each step (auxiliary-loss-free balancing), never by gradient, and it never enters
  the gate values: it only decides *which* experts a token uses;
- group-limited top-k: experts are split into n_group groups (nodes), each token keeps the topk_group
  best groups (group score: sum of its top-2 biased scores for noaux_tc, max for group_limited_greedy)
  and picks its top-k experts inside them;
- gate values: s of the chosen experts, normalised over them when norm_topk_prob, times
  routed_scaling_factor.

Experts run as grouped GEMMs over tokens sorted by expert (no Python loop over experts on the hot
path); on CPU, when routing is balanced enough, as one batched GEMM over an [E, cap, D] zero-padded
layout instead (`padded_slots`), which runs near the matmul peak where CPU grouped_mm does not.
`GroupedExperts.forward_sorted` is the seam expert parallelism reuses after its all-to-all.

Decode on CPU (the inference engine switches it on: no autograd, a few tokens) runs the routed and
shared experts as two embedding bags instead (`MoE.forward_bags`): a product y = W x is the sum over d
of x_d times row d of W^T, which is what `F.embedding_bag(..., per_sample_weights=x)` computes, and it
can pick each (token, expert) pair's rows from one table holding every expert's W^T. So all of a
token's experts (the shared one included, with gate 1) take one bag op for gate+up and one for down,
the gate weights folded in before the down product, instead of ~10 small ops per active expert plus a
sort. The tables are a second copy of the expert weights in [in, out] layout, built on first use and
kept until the weights change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import MLP, Derived, weights_key


@dataclass
class RouterStats:
    """What training needs from one MoE layer's router on one forward.

    `counts` is tallied from `indices` on first access when not given (the inference engine never asks,
    and the tally is four small ops per MoE layer per decode step)."""

    _counts: torch.Tensor | None  # [E] tokens routed to each expert (float, no grad)
    seq_balance_loss: torch.Tensor  # sum_i f_i P_i per sequence, averaged over sequences (no alpha)
    aux_loss: torch.Tensor  # the same over the whole batch: the classic auxiliary loss (no alpha)
    indices: torch.Tensor | None = None  # [N, K] routed experts, when counts is tallied lazily
    n_experts: int = 0

    @property
    def counts(self) -> torch.Tensor:
        if self._counts is None:
            self._counts = expert_counts(self.indices.reshape(-1), self.n_experts).float()
        return self._counts


class Gate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        E = config.n_routed_experts
        self.n_experts = E
        self.topk = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.route_scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> affinities s [N, E] in float32 (gating stays in high precision)."""
        f32 = torch.float32
        w = self.weight if self.weight.dtype == f32 else self.weight.float()
        logits = F.linear(x if x.dtype == f32 else x.float(), w)
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def select(
        self, scores: torch.Tensor, group_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """scores [N, E] -> gate weights [N, K], expert indices [N, K].

        group_mask [N, n_group] (bool) optionally restricts the allowed groups further (node-limited
        routing under expert parallelism supplies it)."""
        N = scores.shape[0]
        biased = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_method != "greedy":
            grouped = biased.view(N, self.n_group, -1)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            if group_mask is not None:
                group_scores = group_scores.masked_fill(~group_mask, float("-inf"))
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            if group_mask is not None:  # fewer allowed groups than topk_group: keep never picks a masked one
                allowed &= group_mask
            biased = grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).view(N, -1)
        indices = biased.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, indices)
        # sigmoid gates are normalised even for top-1 (DeepSeek-V3's inference code, transformers);
        # DeepSeek-V2's softmax gate only for top_k > 1
        if self.norm_topk_prob and (self.topk > 1 or self.scoring_func == "sigmoid"):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.scores(x)
        weights, indices = self.select(scores)
        return weights, indices, scores


PaddedLayout = tuple[torch.Tensor, int]  # (slot of each sorted row in [E * cap], cap)


def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, layout: PaddedLayout | None | str = "auto"
) -> torch.Tensor:
    """Rows of x sorted by expert, counts[e] rows for expert e; w [E, K, N] -> [rows, N].

    CPU: a padded batched GEMM when routing is balanced enough (`padded_slots`; pass its result as
    `layout` when several products share the counts, None to skip it); else torch's grouped GEMM where
    it runs (CPU fp32/bf16, CUDA bf16); else a per-expert loop.
    Autocast does not cover grouped_mm, so under autocast the operands are cast to its dtype here,
    as autocast does for the dense Linear layers."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    w = w.to(x.dtype)
    if x.shape[0] == 0:
        return x @ w[0]
    fast = hasattr(F, "grouped_mm") and (
        (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16))
        or (x.device.type == "cuda" and x.dtype == torch.bfloat16)
    )
    if layout == "auto":
        layout = padded_slots(counts, x.shape[0]) if x.device.type == "cpu" else None
    if isinstance(layout, tuple):
        # CPU: one batched GEMM over [E, cap, K], each expert's rows zero-padded to the largest count.
        # It runs near the matmul peak where CPU grouped_mm pays per group (about 4x slower at E=16);
        # padding rows are zeros in and never read out, so they get no gradient.
        slot, cap = layout
        E = w.shape[0]
        xp = x.new_zeros(E * cap, x.shape[1]).index_copy(0, slot, x).view(E, cap, -1)
        return torch.bmm(xp, w).view(E * cap, -1).index_select(0, slot)
    if fast:
        offs = counts.cumsum(0).to(torch.int32)
        return F.grouped_mm(x.contiguous(), w, offs=offs)
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        out.append(x[start : start + n] @ w[e])
        start += n
    return torch.cat(out)


def padded_slots(
    counts: torch.Tensor, rows: int, max_waste: float = 2.0, small: int = 1024
) -> PaddedLayout | None:
    """For rows sorted by expert (counts [E]): each row's slot in an [E, cap] padded layout, cap = the
    largest count; None when padding would multiply the rows by more than max_waste (skewed routing),
    unless the padded layout is small (<= `small` rows: per-call overhead, not FLOPs, decides there)."""
    E = counts.numel()
    cap = int(counts.max()) if rows else 0
    if rows == 0 or E * cap > max(max_waste * rows, small):
        return None
    expert = torch.repeat_interleave(torch.arange(E, device=counts.device), counts, output_size=rows)
    start = counts.cumsum(0) - counts
    return expert * cap + torch.arange(rows, device=counts.device) - start[expert], cap


def expert_counts(flat: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert [E] (int64) from flat expert indices: bincount with a static output shape
    (scatter_add), so torch.compile traces the MoE without a graph break."""
    ones = torch.ones_like(flat)
    return torch.zeros(n_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, ones)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: w1, w3 [E, I, D] (gate, up), w2 [E, D, I] (down)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [rows, D] sorted by expert with counts [E] -> expert outputs [rows, D] (not yet gated)."""
        if torch.is_autocast_enabled(x.device.type):  # grouped_mm is no autocast op: cast as nn.Linear would
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if x.device.type == "cpu" and x.shape[0] < self.n_experts and not torch.is_grad_enabled():
            return self._forward_active(x, counts)
        # the padded layout pays off in training (BF16, with the backward); FP32 inference (prefill) runs
        # faster on grouped_mm: 1.3 vs 2.3-3.2 ms at 128 tokens, 8-11 vs 8.5-15 ms at 1024 (tiny preset)
        fp32_inference = x.dtype == torch.float32 and not torch.is_grad_enabled()
        layout = padded_slots(counts, x.shape[0]) if x.device.type == "cpu" and not fp32_inference else None
        if layout is not None:  # pad once, run the whole SwiGLU on [E, cap, .], unpad once
            slot, cap = layout
            E = self.n_experts
            w1, w2, w3 = (w.to(x.dtype).transpose(1, 2) for w in (self.w1, self.w2, self.w3))
            xp = x.new_zeros(E * cap, x.shape[1]).index_copy(0, slot, x).view(E, cap, -1)
            h = F.silu(torch.bmm(xp, w1)) * torch.bmm(xp, w3)
            return torch.bmm(h, w2).view(E * cap, -1).index_select(0, slot)
        h = F.silu(grouped_mm(x, self.w1.transpose(1, 2), counts, None)) * grouped_mm(
            x, self.w3.transpose(1, 2), counts, None
        )
        return grouped_mm(h, self.w2.transpose(1, 2), counts, None)

    def _forward_active(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Decode-sized inputs on CPU (fewer rows than experts): the same per-expert products as
        grouped_mm, for the experts that received rows only (CPU grouped_mm pays per group, empty or not)."""
        w1, w2, w3 = (w if w.dtype == x.dtype else w.to(x.dtype) for w in (self.w1, self.w2, self.w3))
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                xe = x[start : start + n]
                out[start : start + n] = F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])
                start += n
        return out

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, D], gate weights/indices [N, K] -> sum_k weight_k * expert_k(x) [N, D]."""
        N, K = indices.shape
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        counts = expert_counts(flat, self.n_experts)
        token = order // K
        out = self.forward_sorted(x.index_select(0, token), counts)  # backward: index_add, not index_put
        out = out * weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))


def balance_losses(
    scores: torch.Tensor, indices: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-wise and batch-wise balance losses sum_i f_i P_i (REFERENCE.md), without alpha.

    f_i = E/(K T) * #tokens choosing i, P_i = mean over tokens of s'_i (s normalised over all experts)."""
    N, E = scores.shape
    K = indices.shape[1]
    T = N // batch
    p = scores / scores.sum(dim=-1, keepdim=True)
    chosen = torch.zeros(N, E, device=scores.device, dtype=scores.dtype).scatter_(1, indices, 1.0)
    f_seq = chosen.view(batch, T, E).sum(1) * (E / (K * T))
    seq = (f_seq * p.view(batch, T, E).mean(1)).sum(-1).mean()
    f_all = chosen.sum(0) * (E / (K * N))
    return seq, (f_all * p.mean(0)).sum()


# Most tokens per forward that take the embedding-bag path (decode steps and short verifies); longer
# inputs (prefill, training) run the grouped GEMMs, which reuse each expert's weights across tokens.
_BAG_MAX_TOKENS = 32


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self._bags = Derived()  # (up, down, n_shared_slots), or None where bags do not apply: decode_tables
        self._bag_consts: dict = {}  # index tensors of forward_bags per token count
        self.decode_bags = False  # set by the inference engine (dsv3.inference.generate.ModelRunner)
        self.n_routed_experts = config.n_routed_experts
        self.gate = Gate(config)
        self.experts = GroupedExperts(
            config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        )
        n_shared = config.n_shared_experts or 0
        self.shared_experts = (
            MLP(config.hidden_size, n_shared * config.moe_intermediate_size) if n_shared else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        B, T, D = x.shape
        x = x.reshape(-1, D)
        weights, indices, scores = self.gate(x)
        tables = self._bags_apply(x)
        if tables is not None:
            y = self.forward_bags(x, weights, indices, tables)
        else:
            y = self.experts(x, weights, indices)
            if self.shared_experts is not None:
                y = y + self.shared_experts(x)
        if torch.is_grad_enabled():
            seq, aux = balance_losses(scores, indices, B)
        else:
            seq = aux = scores.new_zeros(())
        return y.view(B, T, D), RouterStats(None, seq, aux, indices, self.n_routed_experts)

    # ----------------------------------------------------------------- CPU decode: experts as bags
    def _bags_apply(self, x: torch.Tensor) -> tuple | None:
        """`forward_bags`' tables when the embedding-bag path applies to x [N, D], else None."""
        if not self.decode_bags or x.shape[0] > _BAG_MAX_TOKENS or torch.is_grad_enabled():
            return None
        return self.decode_tables(x.dtype)

    def decode_tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Embedding-bag tables: up [(E+S)*D, 2I] (each expert's [w1; w3]^T) and down [(E+S)*I, D]
        (each expert's w2^T), S = shared experts as width-I slots after the E routed ones.

        A shared MLP of width S*I is S experts of width I summed (SwiGLU acts per hidden unit), so it
        is split into S slots. Kept until a weight's storage or version counter changes. None where
        the bag path does not apply: not CPU FP32/BF16, FP8 or expert-parallel experts, inference
        tensors (no version counter to key the tables on); that verdict is kept with the key too."""
        ex, sh = self.experts, self.shared_experts
        try:
            params = [ex.w1, ex.w2, ex.w3]
            if sh is not None:
                params += [sh.w1.weight, sh.w2.weight, sh.w3.weight]
            key = (dtype, weights_key(*params))
        except (AttributeError, RuntimeError):  # other expert modules, inference tensors
            return None
        return self._bags.get(key, lambda: self._build_tables(dtype))

    @torch.no_grad()
    def _build_tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        ex, sh = self.experts, self.shared_experts
        if not (
            type(ex) is GroupedExperts
            and dtype in (torch.float32, torch.bfloat16)
            and ex.w1.device.type == "cpu"
            and (sh is None or all(type(m) is nn.Linear for m in (sh.w1, sh.w2, sh.w3)))
        ):
            return None
        E, I, D = ex.w1.shape
        w1, w2, w3 = ex.w1, ex.w2, ex.w3
        S = 0
        if sh is not None:
            S = sh.w1.weight.shape[0] // I
            w1 = torch.cat([w1, sh.w1.weight.view(S, I, D)])
            w3 = torch.cat([w3, sh.w3.weight.view(S, I, D)])
            w2 = torch.cat([w2, sh.w2.weight.view(D, S, I).transpose(0, 1)])
        up = torch.cat([w1, w3], dim=1).transpose(1, 2).to(dtype).contiguous().view(-1, 2 * I)
        down = w2.transpose(1, 2).to(dtype).contiguous().view(-1, D)
        return up, down, S

    def forward_bags(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, tables: tuple | None = None
    ) -> torch.Tensor:
        """x [N, D], gate weights/indices [N, K] -> routed + shared expert output [N, D] (no autograd).

        Bag (n, j) sums rows e_j*D .. e_j*D+D-1 of `up` weighted by x_n: token n's gate and up
        projections through expert e_j. The down bag of token n sums its M experts' w2^T rows weighted by
        g_j * silu(gate) * up, which is sum_j g_j * expert_j(x_n) in one op."""
        up, down, S = self.decode_tables(x.dtype) if tables is None else tables
        N, D = x.shape
        I = up.shape[1] // 2
        ar_d, ar_i, shared_ids, ones, up_offsets, down_offsets, P = self._bag_constants(N, D, I, S, x)
        ids, g = indices, weights if weights.dtype == x.dtype else weights.to(x.dtype)
        if S:
            ids, g = torch.cat([ids, shared_ids], dim=1), torch.cat([g, ones], dim=1)
        M = ids.shape[1]
        rows = torch.add(ar_d, ids.unsqueeze(-1), alpha=D).view(-1)  # e*D + d
        xs = x.unsqueeze(1).expand(N, M, D).reshape(-1)
        h = F.embedding_bag(rows, up, up_offsets, mode="sum", per_sample_weights=xs).view(N, M, 2 * I)
        gate, upv = h.chunk(2, dim=-1)
        h = F.silu(gate).mul_(upv).mul_(g.unsqueeze(-1))
        rows = torch.add(ar_i, ids.unsqueeze(-1), alpha=I).view(-1)
        y = F.embedding_bag(rows, down, down_offsets, mode="sum", per_sample_weights=h.view(-1))
        return y if P == 1 else y.view(N, P, D).sum(dim=1)

    def _bag_constants(self, N: int, D: int, I: int, S: int, x: torch.Tensor) -> tuple:
        """Index tensors `forward_bags` needs for N tokens, built once per (N, dtype, threads).

        embedding_bag runs its bags in parallel: with fewer tokens than threads, each token's down bag is
        split into P parts (summed after) so that every thread streams a share of the rows."""
        key = (N, x.dtype, x.device, torch.get_num_threads())
        consts = self._bag_consts.get(key)
        if consts is None:
            E, dev = self.n_routed_experts, x.device
            M = self.gate.topk + S
            P = torch.get_num_threads() if torch.get_num_threads() > N else 1
            P = P if (M * I) % P == 0 else 1
            consts = (
                torch.arange(D, device=dev),
                torch.arange(I, device=dev),
                torch.arange(E, E + S, device=dev).expand(N, S),
                torch.ones(N, S, dtype=x.dtype, device=dev),
                torch.arange(0, N * M * D, D, device=dev),
                torch.arange(0, N * M * I, M * I // P, device=dev),
                P,
            )
            self._bag_consts[key] = consts
        return consts
