"""CPU inference speed paths: module swaps the inference engine applies to a built model at setup.

Decoding multiplies a few rows by each weight, so a CPU decode step is bound by reading weights and by
per-op overhead (~400 small ops per token at the tiny preset). Each class here is its reference layer
(same parameters, same names, same numbers up to summation order) with a faster forward for that case,
and falls back to the reference outside it (autograd, many rows, other dtypes); `apply_cpu_inference`
swaps them in by class, as `fully_shard` and the pipeline's weight-gradient split do, so state dicts
and weight sharing are untouched.

- `PackedGEMV`: `F.linear` with an [out, in] weight reads it at ~8 GB/s on one core (MKL's GEMV). A copy
  of the weight as [P, in, out/P] (P = intra-op threads) and one `bmm` lets each thread stream its own
  contiguous slab, 2-4x faster for the multi-MB head and dense-MLP weights (BENCHMARKS.md). Linears
  that read the same input (w1 and w3; MLA's wq_a and wkv_a) share one product.
- `FusedRMSNorm`: FP32 RMSNorm as `F.rms_norm` (bitwise the reference formula), and on a few rows as
  the first half of LayerNorm([x, -x]) with weight [w; w] ([x, -x] has mean 0 and variance mean(x^2)):
  one fused kernel instead of ~6, 17 norms per token at the tiny preset.
- `BagMoE`: the routed and shared experts of a few tokens as two embedding bags. y = W x is the sum
  over d of x_d times row d of W^T, which `F.embedding_bag(..., per_sample_weights=x)` computes, and
  it picks each (token, expert) pair's rows from one table holding every expert's W^T: one bag op for
  gate+up and one for down (gates folded in) instead of ~10 small ops per active expert plus a sort.
- `CachedMLA`: the absorbed weights (wkv_b split per head) kept until wkv_b changes, the additive mask
  from the cache (built once per forward), both down-projections as one product.
- `RopeTableTransformer`: cos/sin as rows of a table of every position (one lookup per forward).

Derived copies (packed weights, tables) are keyed on the weights' storage and version counter
(`weights_key`), so in-place updates (a trainer sharing the weights) rebuild them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.cpu.attention import cpu_attention
from dsv3.cpu.experts import ActiveExperts
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.mla import MLA, LatentCache
from dsv3.model.moe import GroupedExperts, MoE, RouterStats
from dsv3.model.rope import rope_cos_sin
from dsv3.model.transformer import Transformer

GEMV_MAX_ROWS = 32  # most rows a packed GEMV / bag takes: decode steps and short verifies
ROPE_TABLE_MAX = 1 << 16  # most positions the RoPE table covers (64K x 2R values)


def weights_key(*weights: torch.Tensor) -> tuple | None:
    """Identity of weights' current values (storage and in-place version counter), or None for
    inference tensors (no version counter: nothing derived from them can be kept safely)."""
    if any(w.is_inference() for w in weights):
        return None
    return tuple((w.data_ptr(), w._version) for w in weights)


class Derived:
    """One value derived from weights (a packed copy, a table), rebuilt when its key changes."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Any = None

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key != self.key:
            self.value = build()
            self.key = key
        return self.value


def _decode_sized(x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]


class PackedGEMV:
    """y = x [W_1; W_2; ...]^T for a few rows of x, from a cached [P, in, out/P] copy of the
    concatenated weights (one `bmm`, P slabs read in parallel); None where it does not apply (the
    caller runs its Linears). slabs=False keeps the concatenation [out, in] and runs one `F.linear`:
    for weights too small for the slab split to pay (MLA's down-projections), what is saved is calls."""

    def __init__(self, slabs: bool = True) -> None:
        self.slabs = slabs
        self._packed = Derived()

    def __call__(self, x: torch.Tensor, *linears: nn.Linear) -> torch.Tensor | None:
        if not _decode_sized(x) or x.dtype not in (torch.float32, torch.bfloat16):
            return None
        wkey = weights_key(*[m.weight for m in linears])
        if wkey is None or any(m.weight.dtype != x.dtype for m in linears):
            return None
        w = self._packed.get((x.dtype, torch.get_num_threads(), wkey), lambda: self._pack(linears))
        if not self.slabs:
            return F.linear(x, w)
        P, K, Op = w.shape
        y = torch.bmm(x.reshape(1, -1, K).expand(P, -1, K), w)  # [P, rows, O/P]
        return y.transpose(0, 1).reshape(*x.shape[:-1], P * Op)

    def _pack(self, linears: tuple[nn.Linear, ...]) -> torch.Tensor:
        w = torch.cat([m.weight for m in linears]) if len(linears) > 1 else linears[0].weight
        if self.slabs:
            O, K = w.shape
            P = next(p for p in range(min(torch.get_num_threads(), 8), 0, -1) if O % p == 0)
            w = w.reshape(P, O // P, K).transpose(1, 2).contiguous()
        return w.detach()


class PackedLinear(nn.Linear):
    """nn.Linear (bias-free) whose few-row products run as a `PackedGEMV` (the output head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gemv(x, self)
        return F.linear(x, self.weight) if y is None else y

    def setup(self) -> None:
        self.gemv = PackedGEMV()


class PackedMLP(MLP):
    """SwiGLU MLP with w1 and w3 as one packed GEMV and w2 as another on a few rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gemv13(x, self.w1, self.w3)
        if h is None:
            return super().forward(x)
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
        y = self.gemv2(h, self.w2)
        return self.w2(h) if y is None else y

    def setup(self) -> None:
        self.gemv13, self.gemv2 = PackedGEMV(), PackedGEMV()


class FusedRMSNorm(RMSNorm):
    """RMSNorm with fused FP32 kernels at inference (the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() or not x.dtype == w.dtype == torch.float32:
            return super().forward(x)
        key = weights_key(w)
        if key is None or not _decode_sized(x):
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)  # the reference formula, bitwise
        w2 = self.weight2.get(key, lambda: torch.cat([w, w]).detach())
        D = x.shape[-1]
        return F.layer_norm(torch.cat([x, -x], dim=-1), (2 * D,), w2, None, self.eps)[..., :D]

    def setup(self) -> None:
        self.weight2 = Derived()


class CachedMLA(MLA):
    """MLA for the engine: one down-projection product, absorbed weights and mask bias kept."""

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        a = self.gemv_a(x, self.wq_a, self.wkv_a) if self.q_lora_rank is not None else None
        if a is None or mask is not None:
            return super().forward(x, cos, sin, cache, mask)
        q_a, kv_a = a.split_with_sizes([self.q_lora_rank, a.shape[-1] - self.q_lora_rank], dim=-1)
        q_nope, q_pe = self.split_query(self.wq_b(self.q_norm(q_a)), cos, sin)
        c, pe = self.split_latent(kv_a, cos, sin)
        return self.wo(self.attend(q_nope, q_pe, c, pe, cache))

    def attend(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c: torch.Tensor,
        pe: torch.Tensor,
        cache: LatentCache | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if cache is None or not cache.absorb:
            return super().attend(q_nope, q_pe, c, pe, cache, mask)
        c, pe = cache.update(self.layer_id, c, pe)
        bias = cache.score_bias(self.n_heads, q_pe.dtype)  # the engine's caches memoise it per forward
        return self.attend_absorbed(q_nope, q_pe, c, pe, None, bias)

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.wkv_b.weight
        key = None if torch.is_grad_enabled() else weights_key(w)
        if key is None:
            return super().absorbed_weights(dtype)
        # an FP8 wkv_b is dequantised once per weight version, not per token
        return self.absorbed.get((dtype, key), lambda: super(CachedMLA, self).absorbed_weights(dtype))

    def setup(self) -> None:
        self.gemv_a = PackedGEMV(slabs=False)
        self.absorbed = Derived()
        self.attention = cpu_attention


class BagMoE(MoE):
    """MoE whose few-token forwards run the routed and shared experts as two embedding bags."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        B, T, D = x.shape
        tables = self.tables(x)
        if tables is None:
            return super().forward(x)
        x = x.reshape(-1, D)
        weights, indices, scores = self.gate(x)
        y = self.forward_bags(x, weights, indices, tables)
        return y.view(B, T, D), RouterStats(scores, indices, B)

    def setup(self) -> None:
        self.bags = Derived()
        self.bag_consts: dict = {}

    def tables(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """up [(E+S)*D, 2I] (each expert's [w1; w3]^T), down [(E+S)*I, D] (each expert's w2^T), S:
        the shared MLP of width S*I as S width-I slots after the routed experts (SwiGLU acts per hidden
        unit, so it is S experts of width I summed). None where the bag path does not apply."""
        if not _decode_sized(x) or x.dtype not in (torch.float32, torch.bfloat16):
            return None
        ex, sh = self.experts, self.shared_experts
        params = [ex.w1, ex.w2, ex.w3] + ([] if sh is None else [sh.w1.weight, sh.w2.weight, sh.w3.weight])
        key = weights_key(*params)
        return None if key is None else self.bags.get((x.dtype, key), lambda: self._build(x.dtype))

    @torch.no_grad()
    def _build(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        ex, sh = self.experts, self.shared_experts
        E, I, D = ex.w1.shape
        w1, w2, w3, S = ex.w1, ex.w2, ex.w3, 0
        if sh is not None:
            S = sh.w1.weight.shape[0] // I
            w1 = torch.cat([w1, sh.w1.weight.view(S, I, D)])
            w3 = torch.cat([w3, sh.w3.weight.view(S, I, D)])
            w2 = torch.cat([w2, sh.w2.weight.view(D, S, I).transpose(0, 1)])
        up = torch.cat([w1, w3], dim=1).transpose(1, 2).to(dtype).contiguous().view(-1, 2 * I)
        down = w2.transpose(1, 2).to(dtype).contiguous().view(-1, D)
        return up, down, S

    def forward_bags(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, tables: tuple
    ) -> torch.Tensor:
        """x [N, D], gate weights/indices [N, K] -> routed + shared expert output [N, D].

        Bag (n, j) sums rows e_j*D .. e_j*D+D-1 of `up` weighted by x_n: token n's gate and up
        projections through expert e_j. The down bag of token n sums its M experts' w2^T rows weighted
        by g_j * silu(gate) * up, which is sum_j g_j * expert_j(x_n) in one op."""
        up, down, S = tables
        N, D = x.shape
        I = up.shape[1] // 2
        ar_d, ar_i, shared_ids, ones, up_offsets, down_offsets, P = self._constants(N, D, I, S, x)
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

    def _constants(self, N: int, D: int, I: int, S: int, x: torch.Tensor) -> tuple:
        """Index tensors of `forward_bags` for N tokens, built once per (N, dtype, threads). embedding_bag
        runs its bags in parallel: with fewer tokens than threads, each token's down bag is split into
        P parts (summed after) so that every thread streams a share of the rows."""
        key = (N, x.dtype, x.device, torch.get_num_threads())
        if key not in self.bag_consts:
            E, dev = self.n_routed_experts, x.device
            M = self.gate.topk + S
            P = torch.get_num_threads() if torch.get_num_threads() > N else 1
            P = P if (M * I) % P == 0 else 1
            self.bag_consts[key] = (
                torch.arange(D, device=dev),
                torch.arange(I, device=dev),
                torch.arange(E, E + S, device=dev).expand(N, S),
                torch.ones(N, S, dtype=x.dtype, device=dev),
                torch.arange(0, N * M * D, D, device=dev),
                torch.arange(0, N * M * I, M * I // P, device=dev),
                P,
            )
        return self.bag_consts[key]


class RopeTableTransformer(Transformer):
    """Transformer whose inference cos/sin are rows of a [positions, 2R] table (one lookup per forward
    instead of ~10 small kernels); autograd and positions past the table compute them directly."""

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = None if torch.is_grad_enabled() else weights_key(self.inv_freq)
        P = self.config.max_position_embeddings
        if key is None or P > ROPE_TABLE_MAX or int(positions.max()) >= P:
            return super().rope(positions, dtype)
        table = self.rope_table.get((dtype, self.inv_freq.device, key), lambda: self._table(dtype))
        cs = F.embedding(positions, table).unsqueeze(-2)  # [B, S, 1, 2R]
        R = self.config.qk_rope_head_dim
        return cs.split_with_sizes([R, R], dim=-1)

    def _table(self, dtype: torch.dtype) -> torch.Tensor:
        cfg, inv_freq = self.config, self.inv_freq
        P = torch.arange(cfg.max_position_embeddings, device=inv_freq.device)
        cos, sin = rope_cos_sin(P, inv_freq, self.rope_attn_factor, dtype, cfg.rope_interleave)
        return torch.cat([cos, sin], dim=-1).squeeze(-2)

    def setup(self) -> None:
        self.rope_table = Derived()


def _swap(module: nn.Module, cls: type) -> None:
    """Give `module` the subclass `cls` of its class in place (parameters and names unchanged)."""
    module.__class__ = cls
    module.setup()


def apply_cpu_inference(model: Transformer) -> Transformer:
    """Swap in the CPU inference speed paths (the module docstring); idempotent. Only exact reference
    classes are swapped: FP8 or expert-parallel modules keep their own forwards."""
    for m in model.modules():
        if type(m) is Transformer:
            _swap(m, RopeTableTransformer)
        elif type(m) is MLA:
            _swap(m, CachedMLA)
        elif type(m) is RMSNorm:
            _swap(m, FusedRMSNorm)
        elif type(m) is MLP and all(type(w) is nn.Linear for w in (m.w1, m.w2, m.w3)):
            _swap(m, PackedMLP)
        elif type(m) is GroupedExperts:
            m.__class__ = ActiveExperts
    for m in model.modules():
        if type(m) is MoE and type(m.experts) in (GroupedExperts, ActiveExperts):
            sh = m.shared_experts
            if sh is None or all(type(w) is nn.Linear for w in (sh.w1, sh.w2, sh.w3)):
                _swap(m, BagMoE)
    if type(model.head) is nn.Linear and model.head.bias is None:
        _swap(model.head, PackedLinear)
    return model
