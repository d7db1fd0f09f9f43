"""Planner FLOPs against torch's FLOP counter run on the real model (prefill/training and absorbed decode)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsv3.config import ModelConfig
from dsv3.model import Transformer
from dsv3.plan.flops import (
    attention_flops_per_key,
    decode_flops,
    forward_flops,
    layer_forward_flops,
    prefill_flops,
    train_flops_per_token,
)


def _grouped_mm_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
    return 2 * x_shape[0] * x_shape[1] * w_shape[-1]  # x [rows, K] @ w[e] [K, N], each row once


def _count(fn, v_head_dim=None):
    mapping = {torch.ops.aten._grouped_mm: _grouped_mm_flops}
    if v_head_dim is not None:
        # CPU SDPA's fused kernel: the model pads v to the q/k head size for it, so count the real v width
        def sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):
            B, H, S, D = q
            return 2 * B * H * S * k[2] * (D + v_head_dim)

        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter, torch.no_grad():
        fn()
    return {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


CONFIGS = {
    "debug": {},
    "v2-style": dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None),
    "dense": dict(n_routed_experts=None, num_nextn_predict_layers=0),
}


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_forward_flops_match_flop_counter(variant):
    cfg = ModelConfig.from_preset("debug").replace(**CONFIGS[variant])
    model = Transformer(cfg)
    B, T = 2, 12
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    counts = _count(lambda: model(ids, with_mtp=cfg.num_nextn_predict_layers > 0), cfg.v_head_dim)
    # torch counts the full (non-causal) S x S attention; the planner counts the causal half (T+1)/2
    key = "aten._scaled_dot_product_flash_attention_for_cpu" if "aten.bmm" not in counts else "aten.bmm"
    attn = counts.pop(key) * (T + 1) / (2 * T)
    f = forward_flops(cfg, T)
    assert sum(counts.values()) + attn == pytest.approx(f.total * B * T, rel=1e-12)
    assert f.attention == attention_flops_per_key(cfg) * (T + 1) / 2 * cfg.num_hidden_layers


def test_training_is_three_forwards_and_mtp_optional():
    cfg = ModelConfig.from_preset("tiny")
    assert train_flops_per_token(cfg, 256) == 3 * forward_flops(cfg, 256).total
    no_mtp = forward_flops(cfg, 256, include_mtp=False)
    assert no_mtp.mtp == 0 and no_mtp.gemm == forward_flops(cfg, 256).gemm
    assert prefill_flops(cfg, 100) == 100 * forward_flops(cfg, 100, include_mtp=False).total


class _LatentCache:
    """Minimal cache: keeps each layer's latent; `absorb` picks the decode path."""

    def __init__(self):
        self.store, self.mask, self.absorb = {}, None, False

    def update(self, layer_id, c, pe):
        if layer_id in self.store:
            c0, pe0 = self.store[layer_id]
            c, pe = torch.cat([c0, c], 1), torch.cat([pe0, pe], 1)
        self.store[layer_id] = (c, pe)
        return c, pe


def test_decode_flops_match_absorbed_decode():
    cfg = ModelConfig.from_preset("debug")
    model = Transformer(cfg)
    T = 9  # prompt; the decode step then attends T + 1 keys
    cache = _LatentCache()
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, T)), cache=cache)
    cache.absorb = True
    counts = _count(lambda: model(torch.tensor([[3]]), positions=torch.tensor([[T]]), cache=cache))
    assert sum(counts.values()) == decode_flops(cfg, T + 1, absorbed=True)
    # absorbed decode spends more FLOPs per key than per-head K/V would (it trades FLOPs for cache bytes)
    assert decode_flops(cfg, 1000) > decode_flops(cfg, 1000, absorbed=False)


def test_v3_training_flops_and_validation():
    cfg = ModelConfig.from_preset("deepseek-v3-671b")
    f = forward_flops(cfg, 4096)
    # ~6 x 37B activated parameters + attention (~10 GFLOP forward at 4K) + the MTP module
    assert 240e9 < train_flops_per_token(cfg, 4096) < 270e9
    assert 9e9 < f.attention < 11e9
    assert layer_forward_flops(cfg, 3, 4096) > layer_forward_flops(cfg, 0, 4096) > 0
    with pytest.raises(ValueError, match="seq_len"):
        forward_flops(cfg, 0)
    with pytest.raises(ValueError, match="layer_id"):
        layer_forward_flops(cfg, 61, 4096)
