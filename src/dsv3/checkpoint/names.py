"""Tensor names: HF DeepSeek-V3 checkpoints <-> dsv3 modules.

HF (published checkpoints, transformers)            dsv3
model.embed_tokens.weight                           embed.weight
model.layers.N.input_layernorm                      layers.N.attn_norm
model.layers.N.self_attn.{q_proj,q_a_proj,...}     layers.N.attn.{wq,wq_a,q_norm,wq_b,wkv_a,kv_norm,wkv_b,wo}
model.layers.N.post_attention_layernorm             layers.N.ffn_norm
model.layers.N.mlp.{gate,down,up}_proj              layers.N.ffn.{w1,w2,w3}            (dense layers)
model.layers.N.mlp.gate.weight / .e_score_...bias   layers.N.ffn.gate.*
model.layers.N.mlp.experts.E.{gate,up,down}_proj    row E of layers.N.ffn.experts.{w1,w3,w2} (stacked)
model.layers.N.mlp.shared_experts.*                 layers.N.ffn.shared_experts.*
model.norm.weight / lm_head.weight                  norm.weight / head.weight
model.layers.{L+k}.{enorm,hnorm,eh_proj}            mtp.k.{enorm,hnorm,eh_proj}        (L = num_hidden_layers)
model.layers.{L+k}.shared_head.norm                 mtp.k.norm
model.layers.{L+k}.<decoder layer tensors>          mtp.k.block.*
model.layers.{L+k}.embed_tokens / shared_head.head  copies of embed / head (stored per MTP module)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ATTN = {
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
}
MLP = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
MTP_OWN = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "shared_head.norm": "norm"}
MTP_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
GLOBAL = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}

_INV = {
    "attn": {v: k for k, v in ATTN.items()},
    "mlp": {v: k for k, v in MLP.items()},
    "norm": {v: k for k, v in NORMS.items()},
    "mtp": {v: k for k, v in MTP_OWN.items()},
    "global": {v: k for k, v in GLOBAL.items()},
}

# Linear weights stored as FP8 + 128x128 weight_scale_inv in DeepSeek's checkpoints: attention projections and
# every MLP / expert projection. Embedding, head, norms, the router gate and eh_proj stay in high precision.
FP8_WEIGHT = re.compile(
    r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.((experts\.\d+|shared_experts)\.)?(gate_proj|up_proj|down_proj))\.weight"
)
SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes in dsv3: a state-dict name, a row of a stacked expert tensor, or a copy."""

    name: str
    expert: int | None = None
    copy: bool = False  # an MTP module's copy of the shared embedding / head: verified, not loaded


def _block_to_dsv3(rest: str) -> tuple[str, int | None] | None:
    """Decoder-layer-relative HF name -> (dsv3 relative name, expert row)."""
    m = re.fullmatch(r"self_attn\.(\w+)\.(weight|bias)", rest)
    if m and m[1] in ATTN:
        return f"attn.{ATTN[m[1]]}.{m[2]}", None
    m = re.fullmatch(r"(input_layernorm|post_attention_layernorm)\.weight", rest)
    if m:
        return f"{NORMS[m[1]]}.weight", None
    m = re.fullmatch(r"mlp\.(gate_proj|down_proj|up_proj)\.weight", rest)
    if m:
        return f"ffn.{MLP[m[1]]}.weight", None
    m = re.fullmatch(r"mlp\.gate\.(weight|e_score_correction_bias)", rest)
    if m:
        return f"ffn.gate.{m[1]}", None
    m = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|down_proj|up_proj)\.weight", rest)
    if m:
        return f"ffn.experts.{MLP[m[2]]}", int(m[1])
    m = re.fullmatch(r"mlp\.shared_experts\.(gate_proj|down_proj|up_proj)\.weight", rest)
    if m:
        return f"ffn.shared_experts.{MLP[m[1]]}.weight", None
    return None


def hf_to_dsv3(hf_name: str, num_hidden_layers: int) -> Target | None:
    """An HF tensor name -> its dsv3 target, or None when the name means nothing to dsv3."""
    if hf_name in GLOBAL:
        return Target(GLOBAL[hf_name])
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if not m:
        return None
    idx, rest = int(m[1]), m[2]
    if idx < num_hidden_layers:
        prefix = f"layers.{idx}."
    else:
        k = idx - num_hidden_layers
        if rest in MTP_COPIES:
            return Target(MTP_COPIES[rest], copy=True)
        own = re.fullmatch(r"(enorm|hnorm|eh_proj|shared_head\.norm)\.weight", rest)
        if own:
            return Target(f"mtp.{k}.{MTP_OWN[own[1]]}.weight")
        prefix = f"mtp.{k}.block."
    mapped = _block_to_dsv3(rest)
    if mapped is None:
        return None
    return Target(prefix + mapped[0], mapped[1])


def _block_to_hf(rest: str, n_experts: int) -> list[tuple[str, int | None]]:
    part, _, tail = rest.partition(".")
    if part == "attn":
        sub, _, kind = tail.partition(".")
        return [(f"self_attn.{_INV['attn'][sub]}.{kind}", None)]
    if part in _INV["norm"]:
        return [(f"{_INV['norm'][part]}.{tail}", None)]
    if part == "ffn":
        sub, _, kind = tail.partition(".")
        if sub in _INV["mlp"]:
            return [(f"mlp.{_INV['mlp'][sub]}.{kind}", None)]
        if sub == "gate":
            return [(f"mlp.gate.{kind}", None)]
        if sub == "experts":
            proj = _INV["mlp"][kind]
            return [(f"mlp.experts.{e}.{proj}.weight", e) for e in range(n_experts)]
        if sub == "shared_experts":
            w, _, kind2 = kind.partition(".")
            return [(f"mlp.shared_experts.{_INV['mlp'][w]}.{kind2}", None)]
    raise ValueError(f"no HF name for dsv3 tensor {rest!r}")


def dsv3_to_hf(name: str, num_hidden_layers: int, n_experts: int) -> list[tuple[str, int | None]]:
    """A dsv3 state-dict name -> [(HF name, expert row or None)] (one per expert for stacked tensors)."""
    if name in _INV["global"]:
        return [(_INV["global"][name], None)]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return [(f"model.layers.{m[1]}.{hf}", e) for hf, e in _block_to_hf(m[2], n_experts)]
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if m:
        prefix = f"model.layers.{num_hidden_layers + int(m[1])}."
        rest = m[2]
        if rest.startswith("block."):
            return [(prefix + hf, e) for hf, e in _block_to_hf(rest[len("block.") :], n_experts)]
        own, _, kind = rest.partition(".")
        if own in _INV["mtp"]:
            return [(f"{prefix}{_INV['mtp'][own]}.{kind}", None)]
    raise ValueError(f"no HF name for dsv3 tensor {name!r}")


def mtp_copy_names(num_hidden_layers: int, depth: int) -> dict[str, str]:
    """HF names of the embedding/head copies stored with MTP module `depth` -> the shared dsv3 tensor."""
    prefix = f"model.layers.{num_hidden_layers + depth}."
    return {prefix + hf: ds for hf, ds in MTP_COPIES.items()}
