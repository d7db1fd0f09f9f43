"""Typed configs with validation, HF config.json in/out and JSON presets.

Field names follow HF `config.json` for model_type deepseek_v3, so a published config loads unchanged
and `to_hf()` writes one that transformers reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
ROPE_TYPES = ("default", "yarn")


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"invalid config: {name}: {msg}")


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture. Defaults are the 671B model's (REFERENCE.md)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight
    seq_aux: bool = True
    # MTP
    num_nextn_predict_layers: int = 1
    # RoPE
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40.0,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
        }
    )
    rope_interleave: bool = True
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    # ---------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layer index (MTP blocks continue the numbering) -> whether its FFN is a MoE."""
        return (
            self.is_moe
            and layer_id >= self.first_k_dense_replace
            and layer_id % max(self.moe_layer_freq, 1) == 0
        )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def kv_cache_values_per_token(self) -> int:
        """Values the absorbed MLA cache holds per token per layer: norm(c_kv) and roped k_rope."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ---------------------------------------------------------------- checks
    def validate(self) -> ModelConfig:
        """Raise ValueError naming the field for an impossible combination; return self."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
        _check(
            isinstance(self.qk_rope_head_dim, int)
            and self.qk_rope_head_dim > 0
            and self.qk_rope_head_dim % 2 == 0,
            "qk_rope_head_dim",
            f"must be a positive even integer (RoPE rotates pairs), got {self.qk_rope_head_dim!r}",
        )
        _check(
            self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
            "q_lora_rank",
            f"must be null (plain wq) or a positive integer, got {self.q_lora_rank!r}",
        )
        _check(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        _check(self.initializer_range > 0, "initializer_range", "must be > 0")
        _check(self.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        _check(self.rope_theta > 0, "rope_theta", "must be > 0")
        _check(
            isinstance(self.num_nextn_predict_layers, int) and self.num_nextn_predict_layers >= 0,
            "num_nextn_predict_layers",
            "must be an integer >= 0",
        )
        _check(self.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0")
        if self.is_moe:
            E = self.n_routed_experts
            _check(isinstance(E, int) and E > 0, "n_routed_experts", "must be a positive integer")
            _check(
                isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0,
                "moe_intermediate_size",
                "must be a positive integer",
            )
            _check(
                self.n_shared_experts is None or self.n_shared_experts >= 0,
                "n_shared_experts",
                "must be >= 0",
            )
            _check(self.scoring_func in SCORING_FUNCS, "scoring_func", f"must be one of {SCORING_FUNCS}")
            _check(self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}")
            g = self.n_group or 1
            tg = self.topk_group or 1
            k = self.num_experts_per_tok
            _check(g > 0, "n_group", "must be >= 1")
            _check(E % g == 0, "n_group", f"n_routed_experts={E} is not divisible by n_group={g}")
            _check(0 < tg <= g, "topk_group", f"must be in [1, n_group={g}], got {tg}")
            _check(isinstance(k, int) and k > 0, "num_experts_per_tok", "must be a positive integer")
            _check(
                k <= tg * (E // g),
                "num_experts_per_tok",
                f"{k} is more than the {tg * (E // g)} experts in topk_group={tg} groups of {E // g}",
            )
            if self.topk_method == "noaux_tc" and g > 1:
                _check(
                    E // g >= 2,
                    "n_group",
                    "noaux_tc scores a group by its top-2 experts: need >= 2 per group",
                )
            _check(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
            _check(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
            _check(self.aux_loss_alpha >= 0, "aux_loss_alpha", "must be >= 0")
        if self.rope_scaling:
            rt = self.rope_type
            _check(rt in ROPE_TYPES, "rope_scaling", f"type must be one of {ROPE_TYPES}, got {rt!r}")
            if rt == "yarn":
                rs = self.rope_scaling
                _check(
                    isinstance(rs.get("factor"), int | float) and rs["factor"] >= 1,
                    "rope_scaling.factor",
                    "yarn needs a factor >= 1",
                )
                _check(
                    isinstance(rs.get("original_max_position_embeddings"), int)
                    and rs["original_max_position_embeddings"] > 0,
                    "rope_scaling.original_max_position_embeddings",
                    "yarn needs a positive integer",
                )
                bf, bs = rs.get("beta_fast", 32), rs.get("beta_slow", 1)
                _check(
                    bf > bs > 0, "rope_scaling.beta_fast", f"need beta_fast > beta_slow > 0, got {bf}, {bs}"
                )
        return self

    # ---------------------------------------------------------------- HF in/out
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from an HF config.json dict (published or transformers-5 style)."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        # transformers 5 writes rope_parameters (rope_theta inside) instead of rope_scaling + rope_theta
        rp = d.get("rope_parameters")
        if rp:
            rp = dict(rp)
            if "rope_theta" in rp:
                kw["rope_theta"] = rp.pop("rope_theta")
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype == "default":
                kw["rope_scaling"] = None
            else:
                rp.pop("rope_type", None)
                kw["rope_scaling"] = {"type": rtype, **rp}
        elif "rope_scaling" in d:
            rs = d["rope_scaling"]
            if rs:
                rs = dict(rs)
                rtype = rs.pop("rope_type", rs.pop("type", "default"))
                kw["rope_scaling"] = None if rtype == "default" else {"type": rtype, **rs}
            else:
                kw["rope_scaling"] = None
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if d.get("model_type") == "deepseek_v2" and "topk_method" not in d:
            kw["topk_method"] = "greedy"
        if d.get("model_type") == "deepseek_v2" and "scoring_func" not in d:
            kw["scoring_func"] = "softmax"
        if d.get("model_type") == "deepseek_v2":
            kw["rope_interleave"] = True  # the V2 format (DeepSeek's code, transformers) always rotates pairs
            if "num_nextn_predict_layers" not in d and "num_mtp_layers" not in d:
                kw["num_nextn_predict_layers"] = 0  # V2 has no MTP
        if "initializer_range" not in d:
            kw["initializer_range"] = 0.02
        return cls(**kw).validate()

    def to_hf(self) -> dict[str, Any]:
        """HF config.json dict (model_type deepseek_v3; published field names)."""
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        v2_style = self.scoring_func == "softmax"
        out = {
            "architectures": ["DeepseekV2ForCausalLM" if v2_style else "DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v2" if v2_style else "deepseek_v3",
            **d,
            "num_key_value_heads": self.num_attention_heads,
            "torch_dtype": "bfloat16",
        }
        return out

    # ---------------------------------------------------------------- presets / files
    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        return cls.from_dict(load_preset(name)["model"])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"invalid config: unknown model field(s) {unknown}")
        return cls(**d).validate()

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf(json.loads(Path(path).read_text()))

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("dsv3.presets").iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset is {"model": {...ModelConfig fields}, "train": {...optional TrainConfig overrides}}."""
    path = resources.files("dsv3.presets") / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return json.loads(path.read_text())


def coerce_value(current: Any, text: str, name: str) -> Any:
    """Parse a CLI `key=value` string to the type of the field's current value."""
    try:
        if isinstance(current, bool):
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if isinstance(current, int) and not isinstance(current, bool):
            if text.lower() in ("none", "null"):
                return None
            return int(text)
        if isinstance(current, float):
            v = float(text)
            if not math.isfinite(v):
                raise ValueError
            return v
        if current is None or isinstance(current, dict | list):
            return json.loads(text) if text not in ("none", "None") else None
        return text
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"invalid value for {name}: {text!r} (expected {type(current).__name__})") from None


@dataclass
class ParallelConfig:
    """How a model is spread over ranks (world size = pp * dp * ep); the process groups are built from
    it by dsv3.parallel.build_mesh. A run's layout is `TrainConfig.parallel` (dp None until
    `TrainConfig.layout(world)` derives it)."""

    dp: int | None = 1  # replicas of each expert shard (ZeRO-1); None = what the world leaves (pp x ep)
    ep: int = 1  # expert-parallel ranks: n_routed_experts / ep experts per rank
    pp: int = 1  # pipeline ranks (the schedule lives in dsv3.parallel.pipeline)
    pp_schedule: str = "1f1b"  # 1f1b, zb1p, dualpipe or dualpipev
    pp_microbatches: int | None = None  # micro-batches per step; None = 2 x pp
    nodes: int = 1  # simulated nodes the EP group spans (ep / nodes ranks per node)
    node_limit: int | None = None  # M: route each token to experts on at most M nodes (None = no limit)
    fp8_dispatch: bool = False  # send dispatched activations as E4M3 with 1x128 scales
    bf16_combine: bool = False  # send expert outputs back (and dispatch gradients) in BF16
    overlap_shared: bool = True  # run the shared expert while the dispatch all-to-all is in flight
    zero1: bool = True  # shard optimizer states over the data-parallel replicas (ZeRO stage 1)
    fp8: bool = False  # FP8 GEMMs (dsv3.fp8.convert_to_fp8), applied first by `parallelize`; the one switch
    backend: str | None = None  # "gloo" / "nccl" / None = nccl with CUDA, else gloo
    timeout_s: float = 120.0  # collective timeout: a dead peer turns into an error, not a hang

    @property
    def world_size(self) -> int:
        return self.pp * (self.dp or 1) * self.ep

    @property
    def data_parallel_size(self) -> int:
        """Ranks that split the batch (and reduce the dense gradients) within one pipeline stage."""
        return (self.dp or 1) * self.ep

    def validate(self, model_config: ModelConfig | None = None) -> ParallelConfig:
        """Raise ValueError naming the field for an impossible layout; return self."""
        for name in ("dp", "ep", "pp", "nodes"):
            v = getattr(self, name)
            ok = (v is None and name == "dp") or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
            _check(ok, name, f"must be a positive integer, got {v!r}")
        schedules = ("1f1b", "zb1p", "dualpipe", "dualpipev")
        _check(self.pp_schedule in schedules, "pp_schedule", f"must be one of {schedules}")
        n = self.pp_microbatches
        _check(n is None or (isinstance(n, int) and n > 0), "pp_microbatches", "must be null or >= 1")
        _check(self.ep % self.nodes == 0, "nodes", f"ep={self.ep} is not divisible by nodes={self.nodes}")
        if self.node_limit is not None:
            _check(
                isinstance(self.node_limit, int) and self.node_limit >= 1,
                "node_limit",
                f"must be a positive integer or null, got {self.node_limit!r}",
            )
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
        _check(
            self.backend in (None, "gloo", "nccl"),
            "backend",
            f"must be gloo, nccl or null, got {self.backend!r}",
        )
        if model_config is None:
            return self
        needs_moe = self.ep > 1 or self.node_limit is not None or self.fp8_dispatch or self.bf16_combine
        if needs_moe:
            _check(
                model_config.is_moe, "ep", "expert parallelism needs a MoE model (n_routed_experts is null)"
            )
        if model_config.is_moe:
            E = model_config.n_routed_experts
            _check(E % self.ep == 0, "ep", f"n_routed_experts={E} is not divisible by ep={self.ep}")
            if self.node_limit is not None:
                per_node = E // self.nodes
                K = model_config.num_experts_per_tok
                _check(
                    min(self.node_limit, self.nodes) * per_node >= K,
                    "node_limit",
                    f"{self.node_limit} node(s) of {per_node} experts cannot hold num_experts_per_tok={K}",
                )
                G = model_config.n_group or 1
                grouped = G > 1 and model_config.topk_method != "greedy"
                _check(
                    not grouped or G % self.nodes == 0,
                    "node_limit",
                    f"node-limited routing needs the router's groups to nest in nodes: n_group={G} must be a "
                    f"multiple of nodes={self.nodes}",
                )
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParallelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"invalid config: parallel: unknown field(s) {unknown}")
        return cls(**d).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# DeepSeek-V3 over 14.8T tokens: constant LR to 10T, cosine to 14.3T, the lowest LR for the last 167B
LR_FRACTIONS_PAPER = (0.676, 0.966, 0.0113)


@dataclass
class TrainConfig:
    """One training run. Schedules are fractions of `steps` (the paper's token milestones over 14.8T).

    LR: linear warmup over warmup_frac, constant peak until decay_start_frac, cosine to min_lr_ratio*lr at
    decay_end_frac, that value until the last final_frac of the run, then final_lr_ratio*lr.
    Batch: ramps linearly from batch_ramp_start*batch_size to batch_size over batch_ramp_frac.
    MTP weight: mtp_weight until mtp_switch_frac, then mtp_weight_final.
    Balance: gamma (bias_update_speed) for the whole run except the last bias_update_off_frac;
    balance_loss "seq" (sequence-wise), "aux" (classic batch auxiliary loss) or "none", weighted by
    balance_alpha (None = the model's aux_loss_alpha)."""

    seq_len: int = 4096
    batch_size: int = 16  # sequences per optimizer step after the ramp
    micro_batch_size: int | None = None  # sequences per forward/backward (gradient accumulation); None = all
    steps: int = 1000
    lr: float = 2.2e-4
    warmup_frac: float = 0.01
    decay_start_frac: float = LR_FRACTIONS_PAPER[0]
    decay_end_frac: float = LR_FRACTIONS_PAPER[1]
    min_lr_ratio: float = 0.1
    final_frac: float = LR_FRACTIONS_PAPER[2]
    final_lr_ratio: float = 0.0332  # 7.3e-6 / 2.2e-4
    batch_ramp_start: float = 0.2  # 3072 / 15360
    batch_ramp_frac: float = 0.032  # 469B / 14.8T
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    moments_dtype: str = "float32"  # AdamW moments: "float32" or "bfloat16" (as the paper)
    dtype: str = "bfloat16"  # compute: "bfloat16" (autocast, fp32 master weights) or "float32"
    mtp_weight: float = 0.3
    mtp_weight_final: float = 0.1
    mtp_switch_frac: float = LR_FRACTIONS_PAPER[0]
    bias_update_speed: float = 0.001  # gamma of auxiliary-loss-free balancing; 0 switches it off
    bias_update_off_frac: float = 0.034  # gamma is 0 for this last fraction (500B of 14.8T)
    balance_loss: str = "seq"
    balance_alpha: float | None = None
    fim_rate: float = 0.1
    dropout: float = 0.0  # residual dropout on attention/FFN outputs (DeepSeek-V3: none; tiny data: some)
    val_frac: float = 0.1
    eval_every: int = 100  # steps; 0 = only at the end
    eval_batches: int = 8  # batches per periodic eval; the final eval covers the whole split
    log_every: int = 1
    ckpt_every: int = 200  # steps; 0 = only at the end (and at --stop-at)
    keep_checkpoints: int = 3
    max_bad_steps: int = 5  # non-finite steps in a row that stop the run
    seed: int = 1234
    compile: bool = False  # torch.compile the loss computation
    # routed-expert execution (dsv3.cpu.EXPERT_BACKENDS): "auto" = "padded" on CPU, else "grouped_mm"
    expert_backend: str = "auto"
    # a model or run directory whose weights the run starts from (SFT, continued pre-training)
    init_from: str | None = None
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    # how the run is spread over ranks (`key=value` reaches these fields directly: ep=2, pp=2, fp8=true)
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(dp=None))

    def validate(self, model_config: ModelConfig | None = None) -> TrainConfig:
        """Raise ValueError naming the field; return self. With the model's config, also what the model
        cannot do (a sequence longer than its positions)."""
        for name in ("seq_len", "batch_size", "steps", "log_every", "keep_checkpoints", "max_bad_steps"):
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
            _check(ok, name, f"must be a positive integer, got {v!r}")
        for name in ("eval_every", "eval_batches", "ckpt_every", "sample_tokens", "seed"):
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
            _check(ok, name, f"must be an integer >= 0, got {v!r}")
        mb = self.micro_batch_size
        _check(
            mb is None or (isinstance(mb, int) and mb > 0),
            "micro_batch_size",
            f"must be null or a positive integer, got {self.micro_batch_size!r}",
        )
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        backends = ("auto", "grouped_mm", "padded")
        _check(self.expert_backend in backends, "expert_backend", f"must be one of {backends}")
        for name in (
            "warmup_frac",
            "decay_start_frac",
            "decay_end_frac",
            "final_frac",
            "min_lr_ratio",
            "final_lr_ratio",
            "batch_ramp_frac",
            "mtp_switch_frac",
            "bias_update_off_frac",
            "fim_rate",
            "dropout",
        ):
            v = getattr(self, name)
            _check(isinstance(v, int | float) and 0 <= v <= 1, name, f"must be in [0, 1], got {v!r}")
        _check(
            self.warmup_frac <= self.decay_start_frac <= self.decay_end_frac <= 1 - self.final_frac,
            "decay_start_frac",
            "need warmup_frac <= decay_start_frac <= decay_end_frac <= 1 - final_frac",
        )
        _check(0 < self.batch_ramp_start <= 1, "batch_ramp_start", "must be in (0, 1]")
        _check(0 < self.val_frac < 1, "val_frac", f"must be in (0, 1), got {self.val_frac}")
        _check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        _check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        _check(self.eps > 0, "eps", "must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.grad_clip > 0, "grad_clip", "must be > 0")
        _check(self.mtp_weight >= 0 and self.mtp_weight_final >= 0, "mtp_weight", "weights must be >= 0")
        _check(self.bias_update_speed >= 0, "bias_update_speed", "must be >= 0")
        _check(self.balance_alpha is None or self.balance_alpha >= 0, "balance_alpha", "must be null or >= 0")
        _check(self.balance_loss in ("seq", "aux", "none"), "balance_loss", "must be 'seq', 'aux' or 'none'")
        dtypes = ("float32", "bfloat16")
        _check(self.moments_dtype in dtypes, "moments_dtype", f"must be one of {dtypes}")
        _check(self.dtype in dtypes, "dtype", f"must be one of {dtypes}")
        _check(self.sample_temperature >= 0, "sample_temperature", "must be >= 0")
        if isinstance(self.parallel, dict):
            self.parallel = ParallelConfig.from_dict(self.parallel)
        pc = self.parallel.validate()
        if pc.pp > 1:  # what the pipeline trainer cannot do, refused before any rank starts
            _check(pc.ep == 1, "pp", f"pipeline parallelism runs with ep = 1 here, got ep={pc.ep}")
            _check(not pc.fp8, "fp8", "FP8 (--fp8) with pipeline parallelism (pp > 1) is not supported yet")
            _check(not self.compile, "compile", "torch.compile is not applied to pipeline stages (pp > 1)")
            _check(
                self.micro_batch_size is None,
                "micro_batch_size",
                "the pipeline sets it (batch / pp_microbatches)",
            )
        if model_config is not None:
            limit = model_config.max_position_embeddings
            _check(
                self.seq_len <= limit,
                "seq_len",
                f"{self.seq_len} is longer than the model's max_position_embeddings={limit}; to train "
                f"longer sequences raise max_position_embeddings (with rope_scaling for YaRN) explicitly",
            )
        return self

    def layout(self, world: int, model_config: ModelConfig | None = None) -> ParallelConfig:
        """The parallel layout of a run of `world` ranks (dp derived when null); ValueError naming the
        field when the ranks cannot hold it or the batch cannot be split over them."""
        pc = self.parallel
        hint = " (start the ranks with --nproc N or torchrun)" if world == 1 else ""
        if world % (pc.ep * pc.pp):
            what = "ep" if pc.pp == 1 else "pp x ep"
            raise ValueError(
                f"invalid config: {what.split()[0]}: {world} rank(s) cannot hold pp={pc.pp} x ep={pc.ep}: "
                f"need a multiple of {what}{hint}"
            )
        dp = world // (pc.ep * pc.pp) if pc.dp is None else pc.dp
        _check(
            pc.pp * dp * pc.ep == world,
            "dp",
            f"pp={pc.pp} x dp={dp} x ep={pc.ep} = {pc.pp * dp * pc.ep} ranks, but the run has {world}{hint}",
        )
        pc = dataclasses.replace(pc, dp=dp).validate(model_config)
        if pc.pp > 1:
            n = pc.pp_microbatches or 2 * pc.pp
            _check(
                self.batch_size % (dp * n) == 0,
                "batch_size",
                f"{self.batch_size} is not divisible into dp={dp} x {n} micro-batches",
            )
            stages = 2 * pc.pp if pc.pp_schedule == "dualpipev" else pc.pp
            _check(
                model_config is None or model_config.num_hidden_layers >= stages,
                "pp",
                f"{stages} stages need at least as many layers, the model has "
                f"{model_config.num_hidden_layers if model_config else '?'}",
            )
        return pc

    @classmethod
    def from_preset(cls, name: str) -> TrainConfig:
        return cls.from_dict(load_preset(name).get("train", {}))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"invalid config: unknown train field(s) {unknown}")
        d = dict(d)
        if isinstance(d.get("parallel"), dict):
            d["parallel"] = ParallelConfig.from_dict(d["parallel"])
        return cls(**d).validate()

    def replace(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **kw).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
