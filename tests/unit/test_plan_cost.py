"""Planner time/cost (the paper's GPU-hour figures) and expert-parallel communication."""

import pytest

from dsv3.config import ModelConfig
from dsv3.plan.comm import ep_comm
from dsv3.plan.cost import training_cost
from dsv3.plan.flops import train_flops_per_token
from dsv3.plan.hardware import HARDWARE, get_hardware

V3 = ModelConfig.from_preset("deepseek-v3-671b")
H800 = get_hardware("h800")


def test_paper_pretraining_cost():
    """180K H800 GPU hours per trillion tokens, 14.8T tokens on 2048 GPUs: 2664K GPU hours, $5.328M at $2."""
    flops = train_flops_per_token(V3, 4096)
    c = training_cost(14.8e12, 2048, flops, H800, gpu_hours_per_trillion=180e3, price=2.0)
    assert c.gpu_hours == pytest.approx(2_664_000, rel=1e-12)
    assert c.dollars == pytest.approx(5_328_000, rel=1e-12)
    assert c.days / 14.8 == pytest.approx(3.66, abs=0.01)  # "3.7 days" per trillion tokens on 2048 GPUs
    assert c.days == pytest.approx(2_664_000 / 2048 / 24)
    assert c.tokens_per_gpu_s == pytest.approx(1e12 / (180e3 * 3600))
    assert c.mfu == pytest.approx(c.tokens_per_gpu_s * flops / 989.5e12)
    assert 0.3 < c.mfu < 0.5 and not c.warnings
    # the same run stated as a measured throughput or as that MFU gives the same hours
    by_tps = training_cost(14.8e12, 2048, flops, H800, tokens_per_gpu_s=c.tokens_per_gpu_s)
    by_mfu = training_cost(14.8e12, 2048, flops, H800, mfu=c.mfu)
    assert by_tps.gpu_hours == pytest.approx(c.gpu_hours) and by_mfu.gpu_hours == pytest.approx(c.gpu_hours)
    fp8 = training_cost(14.8e12, 2048, flops, H800, mfu=c.mfu, precision="fp8")
    assert fp8.gpu_hours == pytest.approx(c.gpu_hours / 2)  # Hopper FP8 peak is twice BF16


def test_cost_validation():
    with pytest.raises(ValueError, match="exactly one"):
        training_cost(1e12, 8, 1e9, H800)
    with pytest.raises(ValueError, match="exactly one"):
        training_cost(1e12, 8, 1e9, H800, mfu=0.4, tokens_per_gpu_s=100.0)
    with pytest.raises(ValueError, match="<= 1"):
        training_cost(1e12, 8, 1e9, H800, mfu=1.5)
    with pytest.raises(ValueError, match="tokens"):
        training_cost(-1, 8, 1e9, H800, mfu=0.4)
    with pytest.raises(ValueError, match="gpus"):
        training_cost(1e12, 0, 1e9, H800, mfu=0.4)
    fast = training_cost(1e12, 8, 1e12, H800, tokens_per_gpu_s=1e4)
    assert fast.mfu > 1 and "exceeds" in fast.warnings[0]


def test_hardware_presets():
    assert set(HARDWARE) == {"h800", "h100", "h200", "b200"}
    for hw in HARDWARE.values():
        assert hw.fp8_flops == pytest.approx(2 * hw.bf16_flops)
        assert hw.nvlink_bw > hw.ib_bw > 0
    assert get_hardware("H200").memory_bytes > get_hardware("h100").memory_bytes
    with pytest.raises(ValueError, match="unknown hardware"):
        get_hardware("tpu")
    with pytest.raises(ValueError, match="ib_bw"):
        H800.replace(ib_bw=-1.0)


def test_v3_ep_traffic_and_node_limited_routing():
    c = ep_comm(V3, H800, ep=64, node_limit=4)  # EP64 over 8 nodes, each token on at most 4 nodes
    assert c.nodes == 8
    assert c.dispatch_bytes == 7168 + 4 * 56  # FP8 values + one FP32 scale per 128
    assert c.combine_bytes == 2 * 7168
    assert (c.ib_copies, c.ib_copies_unlimited, c.nvlink_copies) == (4, 8, 8)
    assert c.ib_bytes == 4 * (7392 + 14336) and c.ib_bytes_unlimited == 2 * c.ib_bytes
    assert c.experts_per_node_free == pytest.approx(3.2)  # "3.2 experts per node", 4 x 3.2 ~ 13 experts
    # IB bound: halving IB traffic doubles the compute/communication ratio; about 1:1 at peak compute
    assert c.ratio == pytest.approx(2 * c.ratio_unlimited)
    assert 0.5 < c.ratio < 1.5
    assert ep_comm(V3, H800, 64, node_limit=4, efficiency=0.5).ratio == pytest.approx(2 * c.ratio)
    intra = ep_comm(V3, H800, ep=8)
    assert intra.nodes == 1 and intra.ib_bytes == 0 and intra.nvlink_bytes > 0
    assert ep_comm(V3, H800, ep=1).ratio is None


def test_ep_comm_validation():
    with pytest.raises(ValueError, match="does not divide"):
        ep_comm(V3, H800, ep=48)
    with pytest.raises(ValueError, match="nodes"):
        ep_comm(V3, H800, ep=64, nodes=3)
    with pytest.raises(ValueError, match="GPUs per node"):
        ep_comm(V3, H800, ep=64, nodes=4)
    with pytest.raises(ValueError, match="node limit"):
        ep_comm(V3, H800, ep=64, node_limit=0)
    with pytest.raises(ValueError, match="MoE"):
        ep_comm(ModelConfig.from_preset("debug").replace(n_routed_experts=None), H800, ep=1)
