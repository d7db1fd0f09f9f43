"""Expert-parallel all-to-all traffic per token per MoE layer, and the compute-to-communication ratio.

Dispatch sends a token's hidden state to the GPUs of its chosen experts in FP8 (D bytes plus an FP32 scale
per 1x128 tile); combine brings the expert outputs back in BF16 (2 D bytes) (report sec. 3.3.2).

Topology (report sec. 3.2.2): the EP group spans `nodes` nodes. A token crosses InfiniBand once per node it
uses, not once per expert: it goes to one GPU of each target node, which forwards it over NVLink to the
experts it chose there. Node-limited routing caps the nodes per token at M (4 in V3), so
IB copies per token = min(M, nodes); without the limit a token may use up to min(k, nodes) nodes. Within the
nodes the token may reach all k experts over NVLink (k copies). These are upper bounds: a token's own node
needs no IB copy, and experts on the receiving GPU need no NVLink copy.

IB and NVLink transfers overlap, so communication time per token = max(IB bytes / IB bandwidth, NVLink bytes
/ NVLink bandwidth) for dispatch plus combine; compute time = the forward FLOPs of one MoE layer (attention
and MoE, which DualPipe overlaps with another micro-batch's all-to-all) / (peak FLOP/s x efficiency).
`experts_per_node_free` = NVLink/IB bandwidth: how many experts per node a token can reach over NVLink in
the time its single IB copy takes (the report's "3.2 experts per node", so up to 13 experts per token
with M = 4 at no extra cost).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dsv3.config import ModelConfig
from dsv3.plan.flops import layer_forward_flops
from dsv3.plan.hardware import Hardware


@dataclass(frozen=True)
class EPComm:
    ep: int
    nodes: int
    node_limit: int | None  # M, or None when routing is not node-limited
    dispatch_bytes: float  # per copy (FP8 values + tile scales)
    combine_bytes: float  # per copy (BF16)
    ib_copies: int  # per token per MoE layer with node-limited routing (M = node_limit)
    ib_copies_unlimited: int  # without the node limit
    nvlink_copies: int
    ib_bytes: float  # dispatch + combine over IB per token per MoE layer (node-limited)
    ib_bytes_unlimited: float
    nvlink_bytes: float
    compute_s: float  # per token per MoE layer
    comm_s: float  # node-limited
    comm_s_unlimited: float
    compute_efficiency: float
    experts_per_node_free: float

    @property
    def ratio(self) -> float | None:
        """Compute time / communication time (node-limited); None without communication."""
        return self.compute_s / self.comm_s if self.comm_s > 0 else None

    @property
    def ratio_unlimited(self) -> float | None:
        return self.compute_s / self.comm_s_unlimited if self.comm_s_unlimited > 0 else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {**asdict(self), "ratio": self.ratio, "ratio_unlimited": self.ratio_unlimited}


def ep_comm(
    config: ModelConfig,
    hardware: Hardware,
    ep: int,
    nodes: int | None = None,
    node_limit: int | None = None,
    seq_len: int = 4096,
    precision: str = "bf16",
    efficiency: float = 1.0,
    dispatch_dtype: str = "fp8",
) -> EPComm:
    """EP traffic for one token through one MoE layer. nodes defaults to ceil(ep / gpus_per_node)."""
    if not config.is_moe:
        raise ValueError("expert-parallel communication needs a MoE model; this config has no routed experts")
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"ep must be a positive integer, got {ep!r}")
    if config.n_routed_experts % ep:
        raise ValueError(f"ep={ep} does not divide n_routed_experts={config.n_routed_experts}")
    nodes = math.ceil(ep / hardware.gpus_per_node) if nodes is None else nodes
    if not isinstance(nodes, int) or nodes < 1 or ep % nodes:
        raise ValueError(f"nodes must be a positive integer dividing ep={ep}, got {nodes!r}")
    if ep // nodes > hardware.gpus_per_node:
        raise ValueError(
            f"ep={ep} over {nodes} node(s) needs {ep // nodes} GPUs per node; {hardware.name} nodes have "
            f"{hardware.gpus_per_node}"
        )
    if node_limit is not None and (not isinstance(node_limit, int) or node_limit < 1):
        raise ValueError(f"node limit M must be a positive integer, got {node_limit!r}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"compute efficiency must be in (0, 1], got {efficiency!r}")
    if dispatch_dtype not in ("fp8", "bf16"):
        raise ValueError(f"dispatch dtype must be fp8 or bf16, got {dispatch_dtype!r}")
    D, K = config.hidden_size, config.num_experts_per_tok
    dispatch = D + 4 * math.ceil(D / 128) if dispatch_dtype == "fp8" else 2 * D
    combine = 2 * D
    per_copy = dispatch + combine
    if ep == 1:
        ib_lim = ib_unl = nvl = 0
    elif nodes == 1:
        ib_lim = ib_unl = 0
        nvl = K
    else:
        ib_unl = min(K, nodes)
        ib_lim = min(node_limit, nodes, K) if node_limit is not None else ib_unl
        nvl = K
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    if not moe_layers:
        raise ValueError(
            "expert-parallel communication needs a MoE layer; every main layer of this config is dense"
        )
    moe_layer = moe_layers[0]
    compute = layer_forward_flops(config, moe_layer, seq_len) / (hardware.peak_flops(precision) * efficiency)

    def comm_time(ib_copies: int) -> float:
        return max(ib_copies * per_copy / hardware.ib_bw, nvl * per_copy / hardware.nvlink_bw)

    return EPComm(
        ep=ep,
        nodes=nodes,
        node_limit=node_limit,
        dispatch_bytes=float(dispatch),
        combine_bytes=float(combine),
        ib_copies=ib_lim,
        ib_copies_unlimited=ib_unl,
        nvlink_copies=nvl,
        ib_bytes=float(ib_lim * per_copy),
        ib_bytes_unlimited=float(ib_unl * per_copy),
        nvlink_bytes=float(nvl * per_copy),
        compute_s=compute,
        comm_s=comm_time(ib_lim),
        comm_s_unlimited=comm_time(ib_unl),
        compute_efficiency=efficiency,
        experts_per_node_free=hardware.nvlink_bw / hardware.ib_bw,
    )
