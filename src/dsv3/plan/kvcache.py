"""Inference memory: KV cache bytes per token, weight bytes, and the largest batch that fits.

MLA's absorbed decode caches, per token and layer, only norm(c_kv) (kv_lora_rank values) and the roped
k_pe shared by all heads (qk_rope_head_dim values): 576 values for V3, 61 * 576 * 2 = 70,272 bytes per token
in BF16. Attention that cached per-head keys and values (what the naive path would need) would keep
H * (qk_head_dim + v_head_dim) values per layer: 40,960 for V3, 71x more.

max_batch: weights are spread evenly over the serving GPUs (expert parallel and data-parallel attention,
as in the paper's deployment), each sequence's cache lives on one GPU, and a fraction of every GPU's memory
(`reserve`) is left for activations, the CUDA context and fragmentation.
"""

from __future__ import annotations

import math

from dsv3.config import ModelConfig
from dsv3.plan.memory import weight_bytes
from dsv3.plan.params import param_inventory

KV_BYTES = {"bf16": 2.0, "fp8": 1.0}


def _kv_dtype(dtype: str) -> float:
    if dtype not in KV_BYTES:
        raise ValueError(f"kv cache dtype must be one of {tuple(KV_BYTES)}, got {dtype!r}")
    return KV_BYTES[dtype]


def kv_bytes_per_token(config: ModelConfig, dtype: str = "bf16", include_mtp: bool = False) -> float:
    """Compressed MLA cache: (kv_lora_rank + qk_rope_head_dim) values per layer per token."""
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if include_mtp else 0)
    return layers * config.kv_cache_values_per_token * _kv_dtype(dtype)


def per_head_kv_bytes_per_token(config: ModelConfig, dtype: str = "bf16", include_mtp: bool = False) -> float:
    """What caching full per-head K and V would take: H * (qk_head_dim + v_head_dim) values per layer."""
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if include_mtp else 0)
    H = config.num_attention_heads
    return layers * H * (config.qk_head_dim + config.v_head_dim) * _kv_dtype(dtype)


def serving_weight_bytes(config: ModelConfig, dtype: str = "fp8", include_mtp: bool = False) -> float:
    """Bytes of all weights for inference: fp8 = the HF FP8 checkpoint layout (GEMMs FP8 + block scales)."""
    L = config.num_hidden_layers + (config.num_nextn_predict_layers if include_mtp else 0)
    specs = [s for s in param_inventory(config) if s.block is None or s.block < L]
    return weight_bytes(specs, dtype)


def max_batch(
    config: ModelConfig,
    context: int,
    gpu_memory: float,
    gpus: int,
    weight_dtype: str = "fp8",
    kv_dtype: str = "bf16",
    reserve: float = 0.1,
    include_mtp: bool = False,
) -> int:
    """Most sequences of `context` tokens whose compressed cache fits on `gpus` GPUs of `gpu_memory` bytes.

    0 when the weights alone do not fit."""
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive integer, got {context!r}")
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    if not gpu_memory > 0:
        raise ValueError(f"gpu memory must be > 0, got {gpu_memory!r}")
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve must be in [0, 1), got {reserve!r}")
    free = gpu_memory * (1 - reserve) - serving_weight_bytes(config, weight_dtype, include_mtp) / gpus
    if free <= 0:
        return 0
    per_seq = kv_bytes_per_token(config, kv_dtype, include_mtp) * context
    return gpus * math.floor(free / per_seq)


def min_serving_gpus(
    config: ModelConfig,
    gpu_memory: float,
    gpus_per_node: int,
    weight_dtype: str = "fp8",
    reserve: float = 0.1,
) -> int:
    """Fewest GPUs (1, 2, 4, ... up to a node, then whole nodes) whose usable memory the weights fill to at
    most 80%, leaving at least a fifth for the cache."""
    w = serving_weight_bytes(config, weight_dtype)
    usable = gpu_memory * (1 - reserve)
    g = 1
    while w > 0.8 * usable * g:
        g = min(2 * g, gpus_per_node) if g < gpus_per_node else g + gpus_per_node
    return g
