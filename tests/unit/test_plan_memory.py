"""Planner memory: stage split, pipeline in-flight counts, parameter sharding, activations, KV cache."""

import pytest

from dsv3.config import ModelConfig
from dsv3.plan.activations import Savings, block_activation_bytes
from dsv3.plan.hardware import get_hardware
from dsv3.plan.kvcache import kv_bytes_per_token, max_batch, min_serving_gpus, serving_weight_bytes
from dsv3.plan.memory import Layout, Precision, in_flight, memory_per_gpu, stage_blocks
from dsv3.plan.params import count_params, param_inventory

V3 = ModelConfig.from_preset("deepseek-v3-671b")
SMALL = ModelConfig.from_preset("small")


def test_stage_split_covers_blocks_with_lighter_ends():
    stages = stage_blocks(V3, 16)  # 61 layers + 1 MTP = 62 blocks
    assert [b for s in stages for b in s] == list(range(62))
    assert [len(s) for s in stages] == [3] + [4] * 14 + [3]
    assert [len(s) for s in stage_blocks(SMALL, 3)] == [3, 3, 3]
    with pytest.raises(ValueError, match="blocks"):
        stage_blocks(SMALL, 10)


def test_in_flight_matches_the_schedule_table():
    for pp in (2, 4, 8, 16):
        one = [
            sum(n for _, n in in_flight(Layout(pp=pp, schedule="1f1b", micro_batches=4 * pp), r))
            for r in range(pp)
        ]
        assert one == [pp - r for r in range(pp)]  # "PP" on the first rank
        dual = Layout(pp=pp, schedule="dualpipe", micro_batches=2 * pp)
        assert all(sum(n for _, n in in_flight(dual, r)) == pp + 1 for r in range(pp))  # "PP+1" on every rank
        assert all(sorted(s for s, _ in in_flight(dual, r)) == sorted({r, pp - 1 - r}) for r in range(pp))
    # few micro-batches cap what can be in flight
    assert in_flight(Layout(pp=8, micro_batches=2), 0) == [(0, 2)]


def test_every_parameter_lives_on_exactly_one_stage_and_dualpipe_doubles_them():
    one = memory_per_gpu(SMALL, Layout(pp=3, dp=1))
    assert sum(r.params for r in one.ranks) == count_params(SMALL).total_with_mtp
    dual = memory_per_gpu(SMALL, Layout(pp=2, schedule="dualpipe"))
    assert sum(r.params for r in dual.ranks) == 2 * count_params(SMALL).total_with_mtp


def test_sharding_of_experts_and_optimizer_states():
    total = count_params(SMALL).total_with_mtp
    routed = sum(s.numel for s in param_inventory(SMALL) if s.expert)
    base = memory_per_gpu(SMALL, Layout(dp=8, ep=1, zero1=False)).ranks[0]
    assert base.params == total
    assert base.weights == 2 * total and base.grads == 4 * total
    assert base.master == 4 * total and base.moments == 2 * 2 * total  # BF16 moments
    ep = memory_per_gpu(SMALL, Layout(dp=8, ep=8, zero1=True)).ranks[0]
    assert ep.params == total - routed + routed / 8
    dense = total - routed
    # ZeRO-1: dense states over dp=8, expert states over dp/ep = 1 replica
    assert ep.master == pytest.approx(4 * (dense / 8 + routed / 8))
    fp32 = memory_per_gpu(SMALL, Layout(dp=8, ep=8), Precision(moments="fp32")).ranks[0]
    assert fp32.moments == pytest.approx(2 * ep.moments)
    fp8 = memory_per_gpu(SMALL, Layout(dp=8, ep=8), Precision(weights="fp8")).ranks[0]
    quantized = sum(s.numel / (8 if s.expert else 1) for s in param_inventory(SMALL) if s.fp8)
    assert fp8.weights - (ep.weights - 2 * quantized) == pytest.approx(  # quantized: 1 byte + scales
        sum((s.numel + 4 * s.fp8_scales) / (8 if s.expert else 1) for s in param_inventory(SMALL) if s.fp8)
    )


def test_fp8_checkpoint_element_count_is_exact():
    """REFERENCE.md: the V3 HF checkpoint holds 684,531,386,000 elements: the main model, the MTP module with
    its own embedding and head copies, the FP32 128x128 block scales and the balance biases."""
    c = count_params(V3)
    scales = sum(s.fp8_scales for s in param_inventory(V3))
    moe_layers = sum(V3.is_moe_layer(i) for i in range(V3.num_hidden_layers + V3.num_nextn_predict_layers))
    copies = 2 * V3.vocab_size * V3.hidden_size
    assert c.total_with_mtp + copies + scales + moe_layers * V3.n_routed_experts == 684_531_386_000


def test_v3_moe_layer_activations_by_hand():
    D, Q, C, R, H, E, K, I = 7168, 1536, 512, 64, 128, 256, 8, 2048
    fp8, e5m6 = 1 + 4 / 128, 1.5 + 4 / 128
    kept_bf16 = D + Q + (C + R) + D  # norm inputs, wq_a / wkv_a outputs
    fp32 = H + E + K  # lse, router scores, gate weights
    paper = 2 * kept_bf16 + 4 * fp32 + e5m6 * H * 128 + fp8 * (K * D + K * 2 * I + 2 * I)
    assert sum(block_activation_bytes(V3, 3).values()) == pytest.approx(paper)
    none = Savings(False, False, False)
    norm_out = D + Q + C + D
    up = H * 192 * 2 + H * 128
    naive = 2 * (kept_bf16 + norm_out + up + H * 128 + K * D + 3 * K * I + 3 * I) + 4 * fp32
    assert sum(block_activation_bytes(V3, 3, none).values()) == pytest.approx(naive)
    # each saving on its own helps
    for s in (Savings(True, False, False), Savings(False, True, False), Savings(False, False, True)):
        assert sum(block_activation_bytes(V3, 3, s).values()) < naive


def test_v3_paper_layout_fits_an_h800_only_with_the_savings():
    lay = Layout(dp=128, ep=64, pp=16, schedule="dualpipe", micro_batches=32, seq_len=4096)
    mem = 81559 * 2**20
    assert memory_per_gpu(V3, lay).peak.total < mem
    assert memory_per_gpu(V3, lay, savings=Savings(False, False, False)).peak.total > mem


@pytest.mark.parametrize(
    "layout, match",
    [
        (Layout(ep=3, dp=3), "does not divide n_routed_experts"),
        (Layout(ep=8, dp=4), "must divide dp"),
        (Layout(pp=100), "blocks"),
        (Layout(pp=3, schedule="dualpipe"), "even pp"),
        (Layout(pp=2, schedule="dualpipe", micro_batches=5), "even number of micro-batches"),
        (Layout(dp=-1), "dp must be a positive integer"),
        (Layout(seq_len=0), "seq_len"),
        (Layout(schedule="gpipe"), "schedule"),
    ],
)
def test_bad_layouts(layout, match):
    with pytest.raises(ValueError, match=match):
        memory_per_gpu(V3, layout)


def test_kv_cache_and_max_batch():
    assert kv_bytes_per_token(V3, include_mtp=True) == 62 * 576 * 2
    gib = 2**30
    # 10 GiB free per GPU after weights on 2 GPUs; 1 GiB per sequence -> 10 per GPU
    cfg = SMALL
    w = serving_weight_bytes(cfg, "bf16")
    per_seq = kv_bytes_per_token(cfg) * 1024
    mem = (w / 2 + 10 * per_seq + 1) / 0.9
    assert max_batch(cfg, 1024, mem, 2, weight_dtype="bf16") == 20
    assert max_batch(cfg, 1024, mem, 2, weight_dtype="bf16", kv_dtype="fp8") == 40
    h800 = get_hardware("h800")
    assert max_batch(V3, 4096, h800.memory_bytes, 8) == 0  # 671B in FP8 does not fit one 8 x 80 GB node
    assert max_batch(V3, 4096, get_hardware("h200").memory_bytes, 8) > 0
    assert min_serving_gpus(V3, h800.memory_bytes, 8) == 16
    assert 620 * gib < serving_weight_bytes(V3, "fp8") < 640 * gib
    with pytest.raises(ValueError, match="context"):
        max_batch(V3, 0, h800.memory_bytes, 8)
