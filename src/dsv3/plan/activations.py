"""Activation bytes saved for backward, per token, for each block, with the paper's savings switchable.

Each tensor a block keeps for its backward pass is listed with its width (values per token) and a
category that decides its bytes:
- `norm_in`: inputs of RMSNorm and other non-GEMM ops (the residual stream, wq_a / wkv_a outputs): BF16;
- `norm_out`: RMSNorm outputs, i.e. inputs of the following GEMMs. Dropped when RMSNorm is recomputed
  (sec. 3.2.3 of the report: recompute every RMSNorm in the backward pass);
- `up_proj`: the MLA up-projections' outputs q (wq_b) and k, v (wkv_b) that the attention core keeps.
  Dropped when they are recomputed from the cached latent (sec. 3.2.3);
- `linear_in`: a GEMM's input (the dispatched tokens entering the routed experts): BF16, or FP8 with a
  1x128 tile scale (1 + 4/128 bytes) when activations are cached in FP8 (sec. 3.3.2);
- `attn_out`: the attention output, wo's input, also used by the attention backward: BF16, or the paper's
  E5M6 format (1.5 bytes + tile scale) with FP8 caching;
- `swiglu_in` / `swiglu_out`: SwiGLU's inputs (w1, w3 outputs) and output (w2's input). With FP8 caching the
  input is kept in FP8 and the output recomputed (sec. 3.3.2: "cache the inputs of the SwiGLU operator and
  recompute its output"); without it both are BF16;
- `fp32`: attention log-sum-exp, router scores and gate weights (kept in FP32).
The routed experts' gate weight is assumed applied to the down-projection input, so its gradient needs no
extra copy of the expert outputs. The output head's logits are counted in FP32 (a non-chunked cross
entropy keeps them for the backward).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig

FP8_TILE = 1 + 4 / 128  # one byte per value plus an FP32 scale per 1x128 tile
E5M6_TILE = 1.5 + 4 / 128


@dataclass(frozen=True)
class Savings:
    recompute_norm: bool = True  # recompute RMSNorm outputs in backward
    recompute_up_proj: bool = True  # recompute MLA up-projections (q, k, v) in backward
    fp8_activations: bool = True  # cache GEMM inputs in FP8 (E5M6 for the attention output)

    def bytes_per_value(self, category: str) -> float:
        fp8 = self.fp8_activations
        table = {
            "norm_in": 2.0,
            "norm_out": 0.0 if self.recompute_norm else (FP8_TILE if fp8 else 2.0),
            "up_proj": 0.0 if self.recompute_up_proj else 2.0,
            "linear_in": FP8_TILE if fp8 else 2.0,
            "attn_out": E5M6_TILE if fp8 else 2.0,
            "swiglu_in": FP8_TILE if fp8 else 2.0,
            "swiglu_out": 0.0 if fp8 else 2.0,
            "fp32": 4.0,
            "logits": 4.0,
        }
        if category not in table:
            raise ValueError(f"unknown activation category {category!r}")
        return table[category]


def _attention(config: ModelConfig) -> list[tuple[str, int, str]]:
    c = config
    D, H = c.hidden_size, c.num_attention_heads
    out = [("attn_norm.in", D, "norm_in"), ("attn_norm.out", D, "norm_out")]
    if c.q_lora_rank is not None:
        out += [("attn.wq_a.out", c.q_lora_rank, "norm_in"), ("attn.q_norm.out", c.q_lora_rank, "norm_out")]
        q_cat = "up_proj"
    else:
        q_cat = "linear_in"  # q = wq x is not an up-projection from a latent: kept (BF16/FP8 like any input)
    out += [
        ("attn.wkv_a.out", c.kv_lora_rank + c.qk_rope_head_dim, "norm_in"),
        ("attn.kv_norm.out", c.kv_lora_rank, "norm_out"),
        ("attn.q", H * c.qk_head_dim, q_cat),
        ("attn.k", H * c.qk_head_dim, "up_proj"),
        ("attn.v", H * c.v_head_dim, "up_proj"),
        ("attn.o", H * c.v_head_dim, "attn_out"),
        ("attn.lse", H, "fp32"),
    ]
    return out


def _ffn(config: ModelConfig, layer_id: int) -> list[tuple[str, int, str]]:
    c = config
    D = c.hidden_size
    out = [("ffn_norm.in", D, "norm_in"), ("ffn_norm.out", D, "norm_out")]
    if not c.is_moe_layer(layer_id):
        I = c.intermediate_size
        return out + [("mlp.w1w3.out", 2 * I, "swiglu_in"), ("mlp.w2.in", I, "swiglu_out")]
    E, K, I = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
    out += [
        ("moe.gate.scores", E, "fp32"),
        ("moe.gate.weights", K, "fp32"),
        ("moe.experts.in", K * D, "linear_in"),
        ("moe.experts.w1w3.out", K * 2 * I, "swiglu_in"),
        ("moe.experts.w2.in", K * I, "swiglu_out"),
    ]
    Is = (c.n_shared_experts or 0) * I
    if Is:
        out += [("moe.shared.w1w3.out", 2 * Is, "swiglu_in"), ("moe.shared.w2.in", Is, "swiglu_out")]
    return out


def _bytes(entries: list[tuple[str, int, str]], savings: Savings) -> dict[str, float]:
    return {name: width * savings.bytes_per_value(cat) for name, width, cat in entries}


def block_activation_bytes(
    config: ModelConfig, block: int, savings: Savings | None = None
) -> dict[str, float]:
    """Bytes per token block `block` (main layer, or MTP module if >= L) keeps for backward, by tensor."""
    savings = savings or Savings()
    L = config.num_hidden_layers
    if not 0 <= block < L + config.num_nextn_predict_layers:
        raise ValueError(f"block must be in [0, {L + config.num_nextn_predict_layers}), got {block}")
    D = config.hidden_size
    entries = _attention(config) + _ffn(config, block)
    if block >= L:  # MTP module: its own norms, projection, final norm and a pass through the shared head
        entries = [
            ("mtp.enorm.in", D, "norm_in"),
            ("mtp.hnorm.in", D, "norm_in"),
            ("mtp.eh_proj.in", 2 * D, "norm_out"),
            *entries,
            ("mtp.norm.in", D, "norm_in"),
            ("mtp.norm.out", D, "norm_out"),
            ("mtp.logits", config.vocab_size, "logits"),
        ]
    return _bytes(entries, savings)


def head_activation_bytes(config: ModelConfig, savings: Savings | None = None) -> dict[str, float]:
    """Bytes per token the final norm, output head and loss keep (on the last pipeline stage)."""
    D = config.hidden_size
    entries = [
        ("norm.in", D, "norm_in"),
        ("norm.out", D, "norm_out"),
        ("logits", config.vocab_size, "logits"),
    ]
    return _bytes(entries, savings or Savings())
