"""Training memory per GPU for a parallel layout (DP, EP, PP with 1F1B / ZB1P / DualPipe, ZeRO-1).

Layout: gpus = dp * pp. Each pipeline stage is replicated over dp data-parallel ranks; routed experts are
sharded over ep of those ranks (ep divides dp, so expert weights are replicated dp/ep times). No tensor
parallelism, as in DeepSeek-V3 (PP16, EP64, ZeRO-1 DP on 2048 GPUs).

Stages: the L main layers and the MTP modules (trained with the model, placed after the last layer as the
paper does with the head) are cut into pp contiguous stages as evenly as possible; when they do not divide,
the middle stages take the extra blocks, so the stages holding the embedding and the head are lighter.
Under DualPipe rank r holds stages r and pp-1-r (two copies of the model across the pipeline: "2x params").

Per rank:
- weights: BF16 (2 bytes), or FP8 for the GEMMs the recipe quantizes (1 byte + a 4-byte scale per 128x128
  block) with the embedding, head, gate and norms in BF16;
- gradients: FP32, full (ZeRO-1 does not shard them);
- FP32 master weights and the two AdamW moments (BF16 as in the paper, or FP32): sharded over the data
  parallel replicas of each parameter with ZeRO-1 (dp for dense parameters, dp/ep for routed experts);
- activations: (activation bytes of one micro-batch through a stage) x (micro-batches in flight). 1F1B and
  ZB1P keep min(pp - r, m) micro-batches on rank r ("PP" on the first rank); DualPipe feeds m/2 from each end,
  so rank r keeps min(pp - r, m/2) for its stage r and min(r + 1, m/2) for its stage pp-1-r ("PP+1").
The peak rank is the maximum of the per-rank totals. Framework buffers, communication buffers and
fragmentation are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv3.config import ModelConfig
from dsv3.plan.activations import Savings, block_activation_bytes, head_activation_bytes
from dsv3.plan.params import ParamSpec, param_inventory

SCHEDULES = ("1f1b", "zb1p", "dualpipe")
BYTES = {"fp32": 4, "bf16": 2}


def _positive(name: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    ep: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    micro_batches: int | None = None  # per step per pipeline; default 2 * pp
    micro_batch_size: int = 1  # sequences per micro-batch
    seq_len: int = 4096
    zero1: bool = True

    @property
    def gpus(self) -> int:
        return self.dp * self.pp

    @property
    def m(self) -> int:
        return self.micro_batches if self.micro_batches is not None else 2 * self.pp

    def validate(self, config: ModelConfig) -> Layout:
        for name in ("dp", "ep", "pp", "micro_batch_size", "seq_len"):
            _positive(name, getattr(self, name))
        _positive("micro_batches", self.m)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        E = config.n_routed_experts if config.is_moe else 0
        if self.ep > 1 and not E:
            raise ValueError(f"ep={self.ep} needs a MoE model; this config has no routed experts")
        if E and E % self.ep:
            raise ValueError(f"ep={self.ep} does not divide n_routed_experts={E}")
        if self.dp % self.ep:
            raise ValueError(
                f"ep={self.ep} must divide dp={self.dp} (expert parallel groups are cut from DP ranks)"
            )
        n_blocks = config.num_hidden_layers + config.num_nextn_predict_layers
        if self.pp > n_blocks:
            raise ValueError(
                f"pp={self.pp} is more than the {n_blocks} blocks (layers + MTP) to split into stages"
            )
        if self.schedule == "dualpipe":
            if self.pp % 2:
                raise ValueError(f"dualpipe needs an even pp, got {self.pp}")
            if self.m % 2:
                raise ValueError(f"dualpipe needs an even number of micro-batches, got {self.m}")
        return self


def stage_blocks(config: ModelConfig, pp: int) -> list[list[int]]:
    """Blocks (main layers then MTP modules) of each of pp contiguous stages; the middle ones take extras."""
    n = config.num_hidden_layers + config.num_nextn_predict_layers
    _positive("pp", pp)
    if pp > n:
        raise ValueError(f"pp={pp} is more than the {n} blocks (layers + MTP) to split into stages")
    base, extra = divmod(n, pp)
    order = list(range(1, pp - 1)) + [0, pp - 1] if pp > 2 else list(range(pp))
    sizes = [base] * pp
    for s in order[:extra]:
        sizes[s] += 1
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def stage_specs(config: ModelConfig, pp: int) -> list[list[ParamSpec]]:
    """Parameters of each stage: its blocks, the embedding on the first, final norm and head on the last."""
    blocks = stage_blocks(config, pp)
    where = {b: s for s, bs in enumerate(blocks) for b in bs}
    out: list[list[ParamSpec]] = [[] for _ in range(pp)]
    for spec in param_inventory(config):
        if spec.block is not None:
            out[where[spec.block]].append(spec)
        elif spec.kind == "embed":
            out[0].append(spec)
            if config.tie_word_embeddings and pp > 1:  # the last stage needs its own copy for the head
                out[-1].append(spec)
        else:
            out[-1].append(spec)
    return out


@dataclass(frozen=True)
class Precision:
    weights: str = "bf16"  # bf16 | fp8
    grads: str = "fp32"  # fp32 | bf16
    master: str = "fp32"  # fp32 master copy kept by the optimizer
    moments: str = "bf16"  # bf16 (paper) | fp32

    def validate(self) -> Precision:
        if self.weights not in ("bf16", "fp8"):
            raise ValueError(f"weight dtype must be bf16 or fp8, got {self.weights!r}")
        for name in ("grads", "master", "moments"):
            if getattr(self, name) not in BYTES:
                raise ValueError(f"{name} dtype must be one of {tuple(BYTES)}, got {getattr(self, name)!r}")
        return self


def weight_bytes(specs: list[ParamSpec], dtype: str, ep: int = 1) -> float:
    """Bytes of these weights on one GPU (routed experts / ep). fp8: quantized GEMMs 1 byte + block scales."""
    total = 0.0
    for s in specs:
        share = 1 / ep if s.expert else 1
        if dtype == "fp8" and s.fp8:
            total += share * (s.numel + 4 * s.fp8_scales)
        else:
            total += share * s.numel * BYTES["bf16" if dtype == "fp8" else dtype]
    return total


@dataclass(frozen=True)
class RankMemory:
    rank: int  # pipeline rank
    stages: tuple[int, ...]
    params: float  # parameters held (experts / ep)
    weights: float  # bytes
    grads: float
    master: float
    moments: float
    activations: float
    in_flight: tuple[int, ...]  # micro-batches in flight per held stage

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.master + self.moments + self.activations


@dataclass(frozen=True)
class MemoryReport:
    ranks: list[RankMemory] = field(default_factory=list)

    @property
    def peak(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)


def in_flight(layout: Layout, rank: int) -> list[tuple[int, int]]:
    """(stage, micro-batches whose activations it holds at the peak) for each stage on pipeline `rank`."""
    pp, m = layout.pp, layout.m
    if layout.schedule == "dualpipe":
        half = (m + 1) // 2
        return [(rank, min(pp - rank, half)), (pp - 1 - rank, min(rank + 1, half))]
    return [(rank, min(pp - rank, m))]


def memory_per_gpu(
    config: ModelConfig, layout: Layout, precision: Precision | None = None, savings: Savings | None = None
) -> MemoryReport:
    """Bytes per GPU on every pipeline rank (module docstring for the model)."""
    layout.validate(config)
    precision = (precision or Precision()).validate()
    savings = savings or Savings()
    specs = stage_specs(config, layout.pp)
    blocks = stage_blocks(config, layout.pp)
    tokens = layout.micro_batch_size * layout.seq_len
    act_per_stage = []
    for s in range(layout.pp):
        per_token = sum(sum(block_activation_bytes(config, b, savings).values()) for b in blocks[s])
        if s == layout.pp - 1:
            per_token += sum(head_activation_bytes(config, savings).values())
        act_per_stage.append(per_token * tokens)
    ranks = []
    for r in range(layout.pp):
        held = in_flight(layout, r)
        params = weights = grads = master = moments = acts = 0.0
        for stage, n in held:
            for spec in specs[stage]:
                local = spec.numel / layout.ep if spec.expert else spec.numel
                replicas = layout.dp // layout.ep if spec.expert else layout.dp
                shard = replicas if layout.zero1 else 1
                params += local
                grads += local * BYTES[precision.grads]
                master += local * BYTES[precision.master] / shard
                moments += 2 * local * BYTES[precision.moments] / shard
            weights += weight_bytes(specs[stage], precision.weights, layout.ep)
            acts += n * act_per_stage[stage]
        ranks.append(
            RankMemory(
                rank=r,
                stages=tuple(s for s, _ in held),
                params=params,
                weights=weights,
                grads=grads,
                master=master,
                moments=moments,
                activations=acts,
                in_flight=tuple(n for _, n in held),
            )
        )
    return MemoryReport(ranks)
