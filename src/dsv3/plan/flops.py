"""FLOPs per token: training, prefill and decode.

Counting rules (the usual MFU conventions, made explicit):
- a GEMM weight costs 2 FLOPs per element per token that uses it: every Linear, the MoE gate, the output
  head, and routed experts at k/E (only the chosen experts run). Embedding lookups, norms, activations and
  softmax are not counted;
- attention core per layer, per query token and per attended key: scores q.k over qk_head_dim and the
  weighted sum over v_head_dim, for every head: 2 H (Dqk + Dv). Causal attention over a sequence of S
  tokens attends (S+1)/2 keys per token on average;
- training = forward + backward = 3x the forward FLOPs (backward computes input and weight gradients, each
  as costly as the forward GEMM), with the MTP modules included when the model has them (V3 trains with
  them; their head GEMM is a second use of the shared output head);
- prefill at context T: the forward of T tokens of causal attention (no MTP);
- decode at context T: one new token attending T cached keys (the new one included) through the absorbed
  MLA path: scores over the latent cost 2 H (C + R) and the value sum 2 H C per key; folding wkv_b into the
  query and output costs exactly what wkv_b costs, so the GEMM FLOPs equal the forward's. `absorbed=False`
  gives what per-head K/V attention would cost per key instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.plan.params import ParamSpec, active_numel, param_inventory


def _check_len(name: str, n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")


def attention_flops_per_key(config: ModelConfig, absorbed: bool = False) -> int:
    """Forward attention-core FLOPs of one layer for one query token and one attended key."""
    c = config
    H = c.num_attention_heads
    if absorbed:
        return 2 * H * (c.kv_lora_rank + c.qk_rope_head_dim) + 2 * H * c.kv_lora_rank
    return 2 * H * (c.qk_head_dim + c.v_head_dim)


def _gemm_flops(specs: list[ParamSpec], config: ModelConfig) -> float:
    return 2 * sum(active_numel(s, config) for s in specs if s.matmul and s.kind != "head")


def block_gemm_flops(config: ModelConfig, block: int) -> float:
    """Forward GEMM FLOPs per token of one block (main layer, or MTP module incl. its eh_proj)."""
    return _gemm_flops([s for s in param_inventory(config) if s.block == block], config)


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token, split by where they go."""

    gemm: float  # main layers' Linear/gate/expert GEMMs
    head: float  # output head
    attention: float  # attention core of the main layers
    mtp: float  # MTP modules: GEMMs, attention core and their use of the head

    @property
    def total(self) -> float:
        return self.gemm + self.head + self.attention + self.mtp


def forward_flops(config: ModelConfig, seq_len: int, include_mtp: bool = True) -> ForwardFlops:
    """Forward FLOPs per token for causal sequences of seq_len tokens."""
    _check_len("seq_len", seq_len)
    c = config
    L, n_mtp = c.num_hidden_layers, c.num_nextn_predict_layers if include_mtp else 0
    specs = param_inventory(c)
    head = 2 * c.hidden_size * c.vocab_size
    attn_layer = attention_flops_per_key(c) * (seq_len + 1) / 2
    main = [s for s in specs if s.block is not None and s.block < L]
    mtp = [s for s in specs if s.block is not None and L <= s.block < L + n_mtp]
    return ForwardFlops(
        gemm=_gemm_flops(main, c),
        head=float(head),
        attention=attn_layer * L,
        mtp=_gemm_flops(mtp, c) + n_mtp * (attn_layer + head),
    )


def train_flops_per_token(config: ModelConfig, seq_len: int, include_mtp: bool = True) -> float:
    """Forward + backward FLOPs per trained token: 3x the forward."""
    return 3 * forward_flops(config, seq_len, include_mtp).total


def prefill_flops(config: ModelConfig, context: int) -> float:
    """FLOPs to prefill a prompt of `context` tokens (whole prompt, not per token)."""
    return context * forward_flops(config, context, include_mtp=False).total


def decode_flops(config: ModelConfig, context: int, absorbed: bool = True) -> float:
    """FLOPs of one decode step: one new token attending `context` keys in every layer."""
    _check_len("context", context)
    f = forward_flops(config, 1, include_mtp=False)
    attn = attention_flops_per_key(config, absorbed) * context * config.num_hidden_layers
    return f.gemm + f.head + attn


def layer_forward_flops(config: ModelConfig, layer_id: int, seq_len: int) -> float:
    """Forward FLOPs per token of one decoder layer (GEMMs + causal attention core)."""
    _check_len("seq_len", seq_len)
    if not 0 <= layer_id < config.num_hidden_layers:
        raise ValueError(f"layer_id must be in [0, {config.num_hidden_layers}), got {layer_id}")
    return block_gemm_flops(config, layer_id) + attention_flops_per_key(config) * (seq_len + 1) / 2
