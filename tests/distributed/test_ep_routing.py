"""Single-process checks of the expert-parallel pieces: node-limited routing and the FP8 wire format."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.config import ModelConfig
from dsv3.fp8.quant import BLOCK, FP8_MAX
from dsv3.model import MoE
from dsv3.model.moe import Gate
from dsv3.parallel import ExpertParallelMoE, Mesh, ParallelConfig, route
from dsv3.parallel.comm import dequantize_rows_fp8, fp8_row_bytes, quantize_rows_fp8
from dsv3.parallel.expert_parallel import node_mask


@st.composite
def routing_case(draw):
    nodes = draw(st.sampled_from([2, 4, 8]))
    per_node = draw(st.sampled_from([2, 4]))
    E = nodes * per_node
    method = draw(st.sampled_from(["noaux_tc", "group_limited_greedy", "greedy"]))
    # group-limited routers need groups nested in nodes (n_group a multiple of nodes)
    ok = [
        g for g in (1, 2, 4, 8, 16) if E % g == 0 and E // g >= 2 and (method == "greedy" or g % nodes == 0)
    ]
    n_group = draw(st.sampled_from(ok or [1]))
    topk_group = draw(st.integers(1, n_group))
    M = draw(st.integers(1, nodes))
    K = draw(st.integers(1, min(M * per_node, topk_group * (E // n_group), 8)))
    scoring = draw(st.sampled_from(["sigmoid", "softmax"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return nodes, E, n_group, topk_group, M, K, method, scoring, seed


@settings(max_examples=150, deadline=None)
@given(routing_case())
def test_node_limited_routing_never_exceeds_m_nodes(case):
    nodes, E, n_group, topk_group, M, K, method, scoring, seed = case
    cfg = ModelConfig.from_preset("debug").replace(
        n_routed_experts=E,
        n_group=n_group,
        topk_group=topk_group,
        num_experts_per_tok=K,
        topk_method=method,
        scoring_func=scoring,
    )
    ParallelConfig(ep=nodes, nodes=nodes, node_limit=M).validate(cfg)
    g = torch.Generator().manual_seed(seed)
    gate = Gate(cfg)
    if gate.e_score_correction_bias is not None:
        gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    logits = torch.randn(64, E, generator=g) * 3
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
    weights, idx = route(gate, scores, nodes, M)
    assert idx.shape == (64, K) and torch.isfinite(weights).all()
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # K distinct experts
    used = torch.zeros(64, nodes, dtype=torch.bool).scatter_(1, idx // (E // nodes), True)
    assert (used.sum(-1) <= M).all()
    # the chosen nodes are the M best by the sum of top-2 biased affinities
    biased = scores if gate.e_score_correction_bias is None else scores + gate.e_score_correction_bias
    allowed = node_mask(biased, nodes, M)
    assert not (used & ~allowed).any()
    # without a binding limit, routing is exactly the gate's own selection
    w0, i0 = gate.select(scores)
    w1, i1 = route(gate, scores, nodes, None)
    assert torch.equal(i0, i1) and torch.equal(w0, w1)


def test_node_limit_changes_routing_and_both_paths_agree():
    """V3-like layout (groups nest in nodes): the group_mask path equals the masked-affinity path."""
    cfg = ModelConfig.from_preset("debug").replace(
        n_routed_experts=16, n_group=8, topk_group=4, num_experts_per_tok=4
    )
    gate = Gate(cfg)
    gate.e_score_correction_bias.normal_(0, 0.1)
    scores = torch.randn(256, 16).sigmoid()
    _, free = route(gate, scores, 4, None)
    _, limited = route(gate, scores, 4, 1)
    assert not torch.equal(free, limited)
    assert ((limited // 4).amax(-1) == (limited // 4).amin(-1)).all()  # one node per token
    mask = node_mask(scores + gate.e_score_correction_bias, 4, 1).repeat_interleave(4, dim=1)
    _, by_scores = gate.select(scores.masked_fill(~mask, float("-inf")))
    assert torch.equal(limited.sort(-1).values, by_scores.sort(-1).values)


@pytest.mark.parametrize("dim", [64, 128, 200, 384])
def test_fp8_dispatch_roundtrip_within_e4m3_bounds(dim):
    x = torch.randn(97, dim) * torch.logspace(-3, 3, 97).unsqueeze(1)
    x[3] = 0.0
    x[5, :7] = 1e-30  # far below the tile's E4M3 range
    packed = quantize_rows_fp8(x)
    assert packed.dtype == torch.uint8 and packed.shape == (97, fp8_row_bytes(dim))
    y = dequantize_rows_fp8(packed, dim, torch.float32)
    nt = -(-dim // BLOCK)
    tiles = torch.nn.functional.pad(x, (0, nt * BLOCK - dim)).view(97, nt, BLOCK)
    scale = (tiles.abs().amax(-1) / FP8_MAX).repeat_interleave(BLOCK, 1)[:, :dim]
    # E4M3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal spacing 2^-9 * scale
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6)
    assert ((y - x).abs() <= bound).all()
    assert torch.equal(y[3], x[3])
    assert (y - x).abs().max() > 0  # it is lossy
    # the tile amax survives exactly (it maps to 448, representable)
    amax_pos = tiles.abs().argmax(-1)
    got = y.view(97, -1)
    for r in (0, 50, 96):
        c = amax_pos[r, 0].item()
        assert got[r, c] == x[r, c]


def test_fp8_dispatch_single_rank_moe_error_is_small():
    """The same module at ep=1 with FP8 dispatch: output within a few percent of the exact MoE."""
    cfg = ModelConfig.from_preset("debug")
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(3, 7, cfg.hidden_size)
    y_exact, _ = moe(x)
    g_exact = torch.autograd.grad(y_exact.pow(2).sum(), moe.experts.w1)[0]
    ep = ExpertParallelMoE(moe, Mesh.single(ParallelConfig(fp8_dispatch=True)))
    y, _ = ep(x)
    rel = ((y - y_exact).norm() / y_exact.norm()).item()
    assert 0 < rel < 0.05, rel
    g = torch.autograd.grad(y.pow(2).sum(), ep.experts.w1)[0]  # backward runs through the FP8 dispatch
    assert ((g - g_exact).norm() / g_exact.norm()).item() < 0.1
    assert ep.last_load["local_expert_rows"].sum() == x.shape[0] * x.shape[1] * cfg.num_experts_per_tok


def test_parallel_config_validation_messages():
    cfg = ModelConfig.from_preset("debug")
    with pytest.raises(ValueError, match="nodes"):
        ParallelConfig(ep=4, nodes=3).validate()
    with pytest.raises(ValueError, match="n_routed_experts=8 is not divisible by ep=3"):
        ParallelConfig(ep=3).validate(cfg)
    with pytest.raises(ValueError, match="node_limit"):
        ParallelConfig(ep=8, nodes=8, node_limit=1).validate(
            cfg.replace(num_experts_per_tok=2, n_group=1, topk_group=1)
        )
    with pytest.raises(ValueError, match="groups to nest in nodes"):
        ParallelConfig(ep=4, nodes=4, node_limit=2).validate(cfg.replace(n_group=2, topk_group=1))
    with pytest.raises(ValueError, match="unknown field"):
        ParallelConfig.from_dict({"ep": 2, "tp": 2})
    with pytest.raises(ValueError, match="not initialised"):
        from dsv3.parallel import build_mesh

        build_mesh(ParallelConfig(ep=2))


def test_sharded_experts_keep_their_class_and_settings():
    """parallelize converts FP8 first: the EP shard of FP8 experts must still be FP8 experts."""
    convert = pytest.importorskip("dsv3.fp8").convert_to_fp8
    from dsv3.model import Transformer
    from dsv3.parallel.expert_parallel import shard_experts

    cfg = ModelConfig.from_preset("debug")
    model = convert(Transformer(cfg))
    full = model.layers[1].ffn.experts
    part = shard_experts(full, 2, 3)
    assert type(part) is type(full) and type(full).__name__ != "GroupedExperts"
    assert part.n_experts == 3 and torch.equal(part.w1, full.w1[2:5]) and part.w1 is not full.w1
    x, counts = torch.randn(10, cfg.hidden_size), torch.tensor([3, 3, 4])
    ref = full.forward_sorted(x, torch.tensor([0, 0, 3, 3, 4, 0, 0, 0]))
    assert torch.allclose(part.forward_sorted(x, counts), ref, atol=1e-6)


def test_load_report_per_rank_node_and_maxvio():
    from dsv3.parallel import load_report

    mesh = Mesh.single(ParallelConfig(ep=4, nodes=2))
    counts = torch.tensor([[4.0, 0, 1, 1, 2, 2, 3, 3], [2.0] * 8])
    rep = load_report(counts, mesh)
    assert rep["per_rank"].tolist() == [[4, 2, 4, 6], [4, 4, 4, 4]]
    assert rep["per_node"].tolist() == [[6, 10], [8, 8]]
    assert torch.allclose(rep["max_vio"], torch.tensor([4 / 2 - 1, 0.0]))
    assert torch.allclose(rep["rank_max_vio"], torch.tensor([6 / 4 - 1, 0.0]))
