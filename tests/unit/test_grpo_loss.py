"""dsv3.rl.grpo_loss against the formulas written out by hand on fixed tensors, for each loss_type (TRL's
semantics), group-normalised advantages (group / batch / none, NaN rewards), and no gradient from a group
whose rewards are all equal."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.rl import group_advantages, grpo_loss, token_logprobs

# 2 sequences x 4 tokens; sequence 0 has 3 completion tokens, sequence 1 has 2
LP = [[-1.0, -0.5, -2.0, -0.3], [-0.2, -1.5, -0.7, -0.9]]
OLD = [[-1.3, -0.5, -1.0, -0.3], [-0.2, -1.0, -0.7, -0.9]]
REF = [[-1.1, -0.4, -1.8, -0.3], [-0.6, -1.4, -0.7, -0.9]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0]]
ADV = [1.5, -0.8]
EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def _by_hand(loss_type: str, beta: float, max_len: int | None = None) -> float:
    """The loss in plain Python floats, term by term."""
    seq_sums, seq_counts = [], []
    for b in range(2):
        s, n = 0.0, 0
        for t in range(4):
            if not MASK[b][t]:
                continue
            r = math.exp(LP[b][t] - OLD[b][t])
            clipped = min(max(r, 1 - EPS), 1 + EPS_HIGH)
            term = -min(r * ADV[b], clipped * ADV[b])
            d = REF[b][t] - LP[b][t]
            term += beta * (math.exp(d) - d - 1)
            s, n = s + term, n + 1
        seq_sums.append(s)
        seq_counts.append(n)
    if loss_type == "grpo":
        return sum(s / n for s, n in zip(seq_sums, seq_counts)) / 2
    if loss_type == "dapo":
        return sum(seq_sums) / sum(seq_counts)
    return sum(seq_sums) / (2 * (max_len or 4))


def _tensors(requires_grad: bool = False):
    lp = torch.tensor(LP, dtype=torch.float64, requires_grad=requires_grad)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return lp, t(OLD), t(REF), t(ADV), t(MASK)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, BETA])
def test_loss_matches_formula(loss_type, beta):
    lp, old, ref, adv, mask = _tensors()
    loss, stats = grpo_loss(
        lp,
        old,
        ref if beta else None,
        adv,
        mask,
        loss_type=loss_type,
        epsilon=EPS,
        epsilon_high=EPS_HIGH,
        beta=beta,
    )
    assert abs(float(loss) - _by_hand(loss_type, beta)) < 1e-6
    assert stats.tokens == 5
    assert (stats.kl is None) == (beta == 0)


def test_dr_grpo_uses_max_completion_length():
    lp, old, ref, adv, mask = _tensors()
    loss, _ = grpo_loss(
        lp,
        old,
        None,
        adv,
        mask,
        loss_type="dr_grpo",
        epsilon=EPS,
        epsilon_high=EPS_HIGH,
        max_completion_length=10,
    )
    assert abs(float(loss) - _by_hand("dr_grpo", 0.0, max_len=10)) < 1e-6


def test_clip_fractions_and_kl():
    lp, old, ref, adv, mask = _tensors()
    _, st = grpo_loss(
        lp, old, ref, adv, mask, loss_type="dapo", epsilon=EPS, epsilon_high=EPS_HIGH, beta=BETA
    )
    # ratios over the mask: e^0.3 (A>0: > 1.28, high-clipped), 1, e^-1 (A>0: not clipped); 1, e^-0.5 (A<0:
    # < 0.8, low-clipped)
    assert st.clip_high == pytest.approx(1 / 5) and st.clip_low == pytest.approx(1 / 5)
    assert st.clip_region == pytest.approx(2 / 5)
    kl = [
        math.exp(REF[b][t] - LP[b][t]) - (REF[b][t] - LP[b][t]) - 1
        for b in range(2)
        for t in range(4)
        if MASK[b][t]
    ]
    assert st.kl == pytest.approx(sum(kl) / 5, abs=1e-9)


def test_gradient_is_the_policy_gradient_when_on_policy():
    """num_iterations=1: old = logprobs.detach(), the ratio is 1, d loss / d logprob = -A / tokens (dapo)."""
    lp, _, _, adv, mask = _tensors(requires_grad=True)
    loss, _ = grpo_loss(lp, lp.detach(), None, adv, mask, loss_type="dapo")
    loss.backward()
    expected = -adv[:, None] * mask / mask.sum()
    assert torch.allclose(lp.grad, expected, atol=1e-12)


def test_equal_rewards_give_zero_advantage_and_zero_gradient():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 0.1, 1.0])
    adv, zero = group_advantages(rewards, 4)
    assert (adv[:4] == 0).all() and zero[:4].all() and not zero[4:].any()
    lp = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(8, 5)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        lp.grad = None
        loss, _ = grpo_loss(lp, lp.detach(), None, adv.double(), mask, loss_type=loss_type)
        loss.backward()
        assert (lp.grad[:4] == 0).all() and (lp.grad[4:].abs().sum(-1) > 0).all()


def test_group_advantages_match_trl():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0], dtype=torch.float64)
    g = r.view(2, 3)
    mean, std = g.mean(1, keepdim=True), g.std(1, keepdim=True)  # Bessel-corrected, as TRL's nanstd
    adv, _ = group_advantages(r, 3, "group")
    assert torch.allclose(adv, ((g - mean) / (std + 1e-4)).flatten())
    adv, _ = group_advantages(r, 3, "batch")
    assert torch.allclose(adv, ((g - mean) / (r.std() + 1e-4)).flatten())
    adv, _ = group_advantages(r, 3, "none")
    assert torch.allclose(adv, (g - mean).flatten())


def test_nan_rewards_are_left_out_and_get_zero_advantage():
    r = torch.tensor([1.0, float("nan"), 0.0, 0.5], dtype=torch.float64)
    adv, _ = group_advantages(r, 4)
    kept = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    assert adv[1] == 0
    assert torch.allclose(adv[[0, 2, 3]], (kept - kept.mean()) / (kept.std() + 1e-4))


def test_bad_inputs_are_clear_errors():
    lp, old, ref, adv, mask = _tensors()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(lp, old, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, old, None, adv[:1], mask)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "std")
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(5), 2)


def test_token_logprobs_and_entropy():
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    lp, ent = token_logprobs(logits, tokens, temperature=0.7, with_entropy=True)
    ref = torch.log_softmax(logits / 0.7, -1)
    assert torch.allclose(lp, ref.gather(-1, tokens[..., None])[..., 0], atol=1e-6)
    assert torch.allclose(ent, -(ref.exp() * ref).sum(-1), atol=1e-6)
