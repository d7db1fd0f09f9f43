"""Parameter inventory: every tensor `dsv3.model.Transformer(config)` creates, from the config alone.

`param_inventory(config)` lists each parameter with its module path and shape, exactly as
`Transformer(config).named_parameters()` would (a test checks this for every preset on the meta device),
plus what the planner needs to know about it:

- `block`: which decoder block it belongs to (0..L-1 main layers, L..L+n_mtp-1 MTP modules; None for the
  embedding, the final norm and the head), so pipeline stages can be formed from blocks;
- `expert`: a routed expert's weight (stacked [E, ...]); expert parallelism shards these over EP ranks and
  a token touches only top-k of the E experts, so only k/E of it is "activated";
- `matmul`: a GEMM weight (cost 2 FLOPs per element per token); `fp8`: a GEMM the FP8 recipe runs in
  FP8 with 128x128 block scales: every Linear except the output head and the MoE gate, which the paper
  keeps in higher precision along with the embedding and the norms, and the MTP eh_proj, which the
  published V3 checkpoint stores in BF16 (with it, the planner's element count of that checkpoint is exact).

Activated parameters: every parameter a token's forward pass reads, MTP modules excluded: routed experts
count k/E, the embedding one row (a lookup), everything else in full. This gives the published figures:
36.6B for V3 ("37B") and 2.45B for V2-Lite ("2.4B"); counting the whole embedding would give 37.6B and 2.7B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv3.config import ModelConfig


@dataclass(frozen=True)
class ParamSpec:
    name: str  # module path as in dsv3.model, e.g. "layers.3.attn.wq_a.weight"
    shape: tuple[int, ...]
    kind: str  # embed | head | norm | attn | mlp | gate | expert | shared | mtp
    block: int | None = None
    expert: bool = False
    matmul: bool = False
    fp8: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def fp8_scales(self) -> int:
        """Number of FP32 128x128 block scales the FP8 checkpoint format stores for this weight."""
        if not self.fp8:
            return 0
        *lead, rows, cols = self.shape
        return math.prod(lead) * math.ceil(rows / 128) * math.ceil(cols / 128)


def _linear(name: str, out_f: int, in_f: int, kind: str, block: int | None, fp8: bool = True) -> ParamSpec:
    return ParamSpec(f"{name}.weight", (out_f, in_f), kind, block, matmul=True, fp8=fp8)


def _norm(name: str, dim: int, block: int | None, kind: str = "norm") -> ParamSpec:
    return ParamSpec(f"{name}.weight", (dim,), kind, block)


def attention_specs(config: ModelConfig, prefix: str, block: int) -> list[ParamSpec]:
    """MLA parameters: wq (or wq_a, q_norm, wq_b), wkv_a, kv_norm, wkv_b, wo."""
    c = config
    D, H = c.hidden_size, c.num_attention_heads
    out: list[ParamSpec] = []
    if c.q_lora_rank is None:
        out.append(_linear(f"{prefix}.wq", H * c.qk_head_dim, D, "attn", block))
    else:
        out.append(_linear(f"{prefix}.wq_a", c.q_lora_rank, D, "attn", block))
        out.append(_norm(f"{prefix}.q_norm", c.q_lora_rank, block))
        out.append(_linear(f"{prefix}.wq_b", H * c.qk_head_dim, c.q_lora_rank, "attn", block))
    out.append(_linear(f"{prefix}.wkv_a", c.kv_lora_rank + c.qk_rope_head_dim, D, "attn", block))
    out.append(_norm(f"{prefix}.kv_norm", c.kv_lora_rank, block))
    out.append(
        _linear(f"{prefix}.wkv_b", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, "attn", block)
    )
    out.append(_linear(f"{prefix}.wo", D, H * c.v_head_dim, "attn", block))
    return out


def ffn_specs(config: ModelConfig, prefix: str, block: int, layer_id: int) -> list[ParamSpec]:
    """Dense SwiGLU MLP, or MoE: gate, stacked routed experts, shared experts."""
    c = config
    D = c.hidden_size
    if not c.is_moe_layer(layer_id):
        I = c.intermediate_size
        return [
            _linear(f"{prefix}.w1", I, D, "mlp", block),
            _linear(f"{prefix}.w2", D, I, "mlp", block),
            _linear(f"{prefix}.w3", I, D, "mlp", block),
        ]
    E, I = c.n_routed_experts, c.moe_intermediate_size
    out = [
        ParamSpec(f"{prefix}.gate.weight", (E, D), "gate", block, matmul=True),
        ParamSpec(f"{prefix}.experts.w1", (E, I, D), "expert", block, expert=True, matmul=True, fp8=True),
        ParamSpec(f"{prefix}.experts.w2", (E, D, I), "expert", block, expert=True, matmul=True, fp8=True),
        ParamSpec(f"{prefix}.experts.w3", (E, I, D), "expert", block, expert=True, matmul=True, fp8=True),
    ]
    n_shared = c.n_shared_experts or 0
    if n_shared:
        Is = n_shared * I
        out += [
            _linear(f"{prefix}.shared_experts.w1", Is, D, "shared", block),
            _linear(f"{prefix}.shared_experts.w2", D, Is, "shared", block),
            _linear(f"{prefix}.shared_experts.w3", Is, D, "shared", block),
        ]
    return out


def block_specs(config: ModelConfig, prefix: str, block: int, layer_id: int) -> list[ParamSpec]:
    D = config.hidden_size
    return [
        _norm(f"{prefix}.attn_norm", D, block),
        *attention_specs(config, f"{prefix}.attn", block),
        _norm(f"{prefix}.ffn_norm", D, block),
        *ffn_specs(config, f"{prefix}.ffn", block, layer_id),
    ]


def param_inventory(config: ModelConfig) -> list[ParamSpec]:
    """Every parameter of Transformer(config), in named_parameters() order (MTP modules last)."""
    c = config
    D, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
    specs = [ParamSpec("embed.weight", (V, D), "embed")]
    for i in range(L):
        specs += block_specs(c, f"layers.{i}", i, i)
    specs.append(_norm("norm", D, None))
    if not c.tie_word_embeddings:  # tied: the head *is* the embedding, one parameter
        specs.append(_linear("head", V, D, "head", None, fp8=False))
    for k in range(c.num_nextn_predict_layers):
        p, b = f"mtp.{k}", L + k
        specs += [_norm(f"{p}.enorm", D, b, "mtp"), _norm(f"{p}.hnorm", D, b, "mtp")]
        specs.append(_linear(f"{p}.eh_proj", D, 2 * D, "mtp", b, fp8=False))  # BF16 in the V3 checkpoint
        specs += block_specs(c, f"{p}.block", b, L + k)
        specs.append(_norm(f"{p}.norm", D, b, "mtp"))
    return specs


def active_numel(spec: ParamSpec, config: ModelConfig) -> float:
    """Elements of this parameter a single token reads: one row of the embedding, top-k of E for routed
    experts, all of everything else."""
    if spec.kind == "embed":
        return float(spec.shape[1])
    if spec.expert:
        return spec.numel * config.num_experts_per_tok / config.n_routed_experts
    return float(spec.numel)


@dataclass(frozen=True)
class ParamCounts:
    total: int  # main model (MTP excluded): the paper's "671B"
    total_with_mtp: int  # everything Transformer(config) holds
    active: int  # per token, main model (the paper's "37B")
    active_with_mtp: int
    embedding: int
    head: int
    attention: int  # all MLA projections and their norms, main layers
    dense_mlp: int
    moe_routed: int
    moe_shared: int
    moe_gate: int
    norms: int  # attn_norm, ffn_norm and the final norm of main layers
    mtp: int  # MTP modules (their blocks included; embedding and head are shared)
    per_block: tuple[int, ...]  # parameters of each block, main layers then MTP modules

    def as_dict(self) -> dict[str, int | list[int]]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "per_block"}
        d["per_block"] = list(self.per_block)
        return d


def count_params(config: ModelConfig) -> ParamCounts:
    """Totals and a breakdown by kind; activated counts follow the module docstring's convention."""
    specs = param_inventory(config)
    L = config.num_hidden_layers
    main = [s for s in specs if s.block is None or s.block < L]
    mtp = [s for s in specs if s.block is not None and s.block >= L]

    def total(group: list[ParamSpec], kinds: tuple[str, ...] | None = None) -> int:
        return sum(s.numel for s in group if kinds is None or s.kind in kinds)

    def active(group: list[ParamSpec]) -> int:
        return round(sum(active_numel(s, config) for s in group))

    attn_names = (".attn.",)
    per_block = [0] * (L + config.num_nextn_predict_layers)
    for s in specs:
        if s.block is not None:
            per_block[s.block] += s.numel
    return ParamCounts(
        total=total(main),
        total_with_mtp=total(specs),
        active=active(main),
        active_with_mtp=active(specs),
        embedding=total(main, ("embed",)),
        head=total(main, ("head",)),
        attention=sum(s.numel for s in main if any(a in s.name for a in attn_names)),
        dense_mlp=total(main, ("mlp",)),
        moe_routed=total(main, ("expert",)),
        moe_shared=total(main, ("shared",)),
        moe_gate=total(main, ("gate",)),
        norms=sum(s.numel for s in main if s.kind == "norm" and ".attn." not in s.name),
        mtp=total(mtp),
        per_block=tuple(per_block),
    )
