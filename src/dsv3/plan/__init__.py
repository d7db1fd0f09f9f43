"""Analytic cost model of a DeepSeek-V3-style run, computed from a ModelConfig and a parallel layout.

params (inventory and counts) -> flops (training / prefill / decode per token) -> memory and activations
(training memory per GPU under DP/EP/PP/ZeRO-1 and a pipeline schedule) -> kvcache (inference memory)
-> comm (expert-parallel all-to-all) -> cost (GPU hours, dollars, MFU); report assembles them and cli is
`dsv3 plan`.
"""

from dsv3.plan.activations import Savings, block_activation_bytes, head_activation_bytes
from dsv3.plan.comm import EPComm, ep_comm
from dsv3.plan.cost import TrainCost, training_cost
from dsv3.plan.flops import (
    ForwardFlops,
    attention_flops_per_key,
    decode_flops,
    forward_flops,
    layer_forward_flops,
    prefill_flops,
    train_flops_per_token,
)
from dsv3.plan.hardware import HARDWARE, Hardware, get_hardware
from dsv3.plan.kvcache import kv_bytes_per_token, max_batch, per_head_kv_bytes_per_token, serving_weight_bytes
from dsv3.plan.memory import Layout, MemoryReport, Precision, RankMemory, memory_per_gpu, stage_blocks
from dsv3.plan.params import ParamCounts, ParamSpec, count_params, param_inventory
from dsv3.plan.report import PlanInputs, Throughput, build_plan, format_table

__all__ = [
    "HARDWARE",
    "EPComm",
    "ForwardFlops",
    "Hardware",
    "Layout",
    "MemoryReport",
    "ParamCounts",
    "ParamSpec",
    "PlanInputs",
    "Precision",
    "RankMemory",
    "Savings",
    "Throughput",
    "TrainCost",
    "attention_flops_per_key",
    "block_activation_bytes",
    "build_plan",
    "count_params",
    "decode_flops",
    "ep_comm",
    "format_table",
    "forward_flops",
    "get_hardware",
    "head_activation_bytes",
    "kv_bytes_per_token",
    "layer_forward_flops",
    "max_batch",
    "memory_per_gpu",
    "param_inventory",
    "per_head_kv_bytes_per_token",
    "prefill_flops",
    "serving_weight_bytes",
    "stage_blocks",
    "train_flops_per_token",
    "training_cost",
]
