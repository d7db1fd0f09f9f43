"""The router: group-limited top-k never leaves the chosen groups, the balance bias moves selection but
never the gate values, sigmoid/softmax gate normalisation."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3 import ModelConfig
from dsv3.model.moe import Gate


def _gate(**kw) -> Gate:
    return Gate(ModelConfig.from_preset("debug").replace(**kw))


@st.composite
def routing_cases(draw):
    n_group = draw(st.sampled_from([2, 4, 8]))
    per_group = draw(st.integers(2, 4))
    topk_group = draw(st.integers(1, n_group))
    topk = draw(st.integers(1, topk_group * per_group))
    method = draw(st.sampled_from(["noaux_tc", "group_limited_greedy"]))
    seed = draw(st.integers(0, 2**31 - 1))
    coarse = draw(st.booleans())  # coarse scores: many ties
    return n_group, per_group, topk_group, topk, method, seed, coarse


@settings(max_examples=60, deadline=None)
@given(routing_cases())
def test_routing_stays_in_chosen_groups(case):
    n_group, per_group, topk_group, topk, method, seed, coarse = case
    E = n_group * per_group
    scoring = "sigmoid" if method == "noaux_tc" else "softmax"
    groups = dict(n_group=n_group, topk_group=topk_group)
    gate = _gate(
        n_routed_experts=E, num_experts_per_tok=topk, topk_method=method, scoring_func=scoring, **groups
    )
    g = torch.Generator().manual_seed(seed)
    N = 16
    scores = torch.rand(N, E, generator=g)
    if coarse:
        scores = (scores * 4).round() / 4
    if gate.e_score_correction_bias is not None:
        gate.e_score_correction_bias.copy_((torch.rand(E, generator=g) - 0.5) * 0.5)
    group_mask = torch.rand(N, n_group, generator=g) > 0.3
    group_mask[torch.arange(N), torch.randint(0, n_group, (N,), generator=g)] = True
    # node-limited routing only passes masks that leave enough experts
    enough = group_mask.sum(1) >= topk_group
    for mask in (None, group_mask):
        weights, idx = gate.select(scores, mask)
        assert idx.shape == (N, topk) and weights.shape == (N, topk)
        assert all(len(set(row.tolist())) == topk for row in idx)  # distinct experts
        biased = scores if gate.e_score_correction_bias is None else scores + gate.e_score_correction_bias
        grouped = biased.view(N, n_group, per_group)
        gs = grouped.topk(2, -1).values.sum(-1) if method == "noaux_tc" else grouped.amax(-1)
        if mask is not None:
            gs = gs.masked_fill(~mask, float("-inf"))
        kth = gs.topk(topk_group, -1).values[:, -1:]  # the weakest chosen group's score
        groups = idx // per_group
        used = gs.gather(1, groups)
        rows = torch.ones(N, dtype=torch.bool) if mask is None else enough
        assert torch.all(used[rows] >= kth[rows])  # every expert comes from a top-topk_group group
        assert all(len(set(r.tolist())) <= topk_group for r in groups[rows])
        if mask is not None:
            assert torch.all(mask[rows].gather(1, groups[rows]))  # never a masked-out group


def test_bias_changes_selection_not_gate_values():
    gate = _gate(
        n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=2.5
    )
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    w0, i0 = gate.select(scores)
    assert set(i0[0].tolist()) == {0, 1}
    gate.e_score_correction_bias.copy_(torch.tensor([0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]))
    w1, i1 = gate.select(scores)
    assert set(i1[0].tolist()) == {0, 7}  # the bias moved expert 1 out and expert 7 in
    # the gate values are the unbiased affinities of the chosen experts, normalised, times the scaling
    expected = scores.gather(1, i1) / scores.gather(1, i1).sum() * 2.5
    torch.testing.assert_close(w1, expected)
    torch.testing.assert_close(w0, scores.gather(1, i0) / scores.gather(1, i0).sum() * 2.5)


def test_bias_shifts_groups_too():
    gate = _gate(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    scores = torch.tensor([[0.9, 0.9, 0.5, 0.5, 0.1, 0.1, 0.2, 0.2]])
    assert set(gate.select(scores)[1][0].tolist()) == {0, 1}
    gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8, 0.8]))
    w, i = gate.select(scores)
    assert set(i[0].tolist()) == {6, 7}
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]) * gate.route_scale)


def test_gate_normalisation_rules():
    scores = torch.tensor([[0.6, 0.2, 0.1, 0.05, 0.02, 0.01, 0.01, 0.01]])
    # sigmoid, top-1: normalised to 1 (DeepSeek-V3 inference code and transformers agree)
    g = _gate(num_experts_per_tok=1, topk_group=1, routed_scaling_factor=1.0)
    torch.testing.assert_close(g.select(scores)[0], torch.tensor([[1.0]]))
    # softmax, top-1 (DeepSeek-V2): not normalised even with norm_topk_prob
    g = _gate(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=1,
              routed_scaling_factor=1.0)  # fmt: skip
    torch.testing.assert_close(g.select(scores)[0], torch.tensor([[0.6]]))
    # no normalisation: raw affinities times the scaling
    g = _gate(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
              routed_scaling_factor=16.0)  # fmt: skip
    torch.testing.assert_close(g.select(scores)[0], torch.tensor([[0.6, 0.2]]) * 16.0)


def test_scores_are_fp32_and_softmax_sums_to_one():
    g = _gate(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1)
    g.weight.data.normal_()
    s = g.scores(torch.randn(5, 64, dtype=torch.bfloat16))
    assert s.dtype == torch.float32
    torch.testing.assert_close(s.sum(-1), torch.ones(5))
