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
path). `GroupedExperts.forward_sorted(x_sorted, counts)` is the one seam of expert execution: FP8
(`dsv3.fp8`), the pipeline's weight-gradient split, CPU layouts (`dsv3.cpu`) replace it by a module swap
at setup, and expert parallelism calls it after its all-to-all. Each implementation names itself in
`backend`, which the trainer prints.

Router statistics (expert counts, balance losses) are computed from the routing on first access
(`RouterStats`): training reads them, inference never does and so never pays for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import MLP


@dataclass
class RouterStats:
    """What training needs from one MoE layer's router on one forward, computed on first access from
    the routing (`scores` [N, E], `indices` [N, K], `batch` sequences), or given (`RouterStats.of`:
    expert parallelism reduces counts over ranks, pipeline stages ship balance losses)."""

    scores: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    batch: int = 1

    @classmethod
    def of(cls, counts: torch.Tensor | None, seq_balance_loss: torch.Tensor, aux_loss: torch.Tensor):
        stats = cls()
        stats.__dict__.update(counts=counts, balance=(seq_balance_loss, aux_loss))
        return stats

    @cached_property
    def counts(self) -> torch.Tensor | None:
        """[E] tokens routed to each expert (float, no grad); None when not known (shipped stats)."""
        return expert_counts(self.indices.reshape(-1), self.scores.shape[1]).float()

    @cached_property
    def balance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence-wise, batch-wise) balance losses sum_i f_i P_i, without alpha."""
        return balance_losses(self.scores, self.indices, self.batch)

    @property
    def seq_balance_loss(self) -> torch.Tensor:
        return self.balance[0]

    @property
    def aux_loss(self) -> torch.Tensor:  # the classic auxiliary loss
        return self.balance[1]


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


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert, counts[e] rows for expert e; w [E, K, N] -> [rows, N].

    torch's grouped GEMM (FP32, BF16); other dtypes run one product per expert. Autocast does not
    cover grouped_mm, so under autocast the operands are cast to its dtype here, as autocast does for
    the dense Linear layers."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    w = w.to(x.dtype)
    if x.shape[0] == 0:
        return x @ w[0]
    if x.dtype in (torch.float32, torch.bfloat16):
        return F.grouped_mm(x.contiguous(), w, offs=counts.cumsum(0).to(torch.int32))
    return torch.cat([xe @ w[e] for e, xe in enumerate(x.split(counts.tolist()))])


def expert_counts(flat: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert [E] (int64) from flat expert indices: bincount with a static output shape
    (scatter_add), so torch.compile traces the MoE without a graph break."""
    ones = torch.ones_like(flat)
    return torch.zeros(n_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, ones)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: w1, w3 [E, I, D] (gate, up), w2 [E, D, I] (down)."""

    backend = "grouped_mm"  # the expert execution strategy (subclasses swapped in at setup rename it)

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [rows, D] sorted by expert with counts [E] -> expert outputs [rows, D] (not yet gated)."""
        h = F.silu(grouped_mm(x, self.w1.transpose(1, 2), counts)) * grouped_mm(
            x, self.w3.transpose(1, 2), counts
        )
        return grouped_mm(h, self.w2.transpose(1, 2), counts)

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

    def extra_repr(self) -> str:
        E, I, D = self.w1.shape
        return f"experts={E}, dim={D}, inter_dim={I}, backend={self.backend}"


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


class MoE(nn.Module):
    """Routed experts (`experts`, chosen by `gate`) plus always-on shared experts, summed."""

    def __init__(self, config: ModelConfig):
        super().__init__()
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
        y = self.experts(x, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, D), RouterStats(scores, indices, B)
