"""Speculative decoding as a pure function, with stub target/draft models whose drafts are always, never
or sometimes right: greedy output must equal plain greedy decoding, and sampling must keep the target's
distribution exactly."""

import pytest
import torch

from dsv3.inference.sampling import SamplingParams
from dsv3.inference.speculative import accept, speculative_generate, speculative_step

V = 23


def nxt(t: torch.Tensor) -> torch.Tensor:
    """The stub target's deterministic next token."""
    return (t * 7 + 3) % V


def onehot_logits(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(t, V).float() * 10.0


def target(tokens: torch.Tensor) -> torch.Tensor:  # [B, 1+k] -> [B, 1+k, V]
    return onehot_logits(nxt(tokens))


def make_draft(k: int, mode: str):
    """Draft logits for the k tokens after the last committed one: right, wrong, or wrong when it is odd."""

    def draft(tokens: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        last = tokens.gather(1, (n - 1)[:, None]).squeeze(1)
        outs = []
        for _ in range(k):
            right = nxt(last)
            wrong = (right + 1) % V
            if mode == "always":
                guess = right
            elif mode == "never":
                guess = wrong
            else:
                guess = torch.where(last % 2 == 1, wrong, right)
            outs.append(onehot_logits(guess))
            last = guess
        return torch.stack(outs, dim=1)

    return draft


def plain_greedy(start: list[int], n: int) -> list[list[int]]:
    rows = []
    for s in start:
        seq, t = [], torch.tensor(s)
        for _ in range(n):
            t = nxt(t)
            seq.append(int(t))
        rows.append(seq)
    return rows


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mode", ["always", "never", "sometimes"])
def test_greedy_is_lossless(mode, k):
    start = [1, 4, 9, 16]
    pending = torch.tensor(start)
    draft = make_draft(k, mode)
    first = draft(pending[:, None], torch.ones(4, dtype=torch.long))
    params = [SamplingParams(temperature=0)] * 4
    out, stats = speculative_generate(target, draft, pending, first, params, max_new_tokens=30)
    assert out == plain_greedy(start, 30)
    if mode == "always":
        assert stats.acceptance == 1.0
        assert stats.tokens_per_forward == k + 1
    elif mode == "never":
        assert stats.accepted == 0 and stats.tokens_per_forward == 1.0
    else:
        assert 0 < stats.acceptance < 1
        assert 1 < stats.tokens_per_forward < k + 1
    assert (
        stats.per_position[0] == stats.accepted if k == 1 else stats.per_position[0] >= stats.per_position[1]
    )


def test_step_commits_and_counts():
    pending = torch.tensor([2, 3])  # 3 is odd: the "sometimes" draft is wrong after it
    draft = make_draft(1, "sometimes")
    step = speculative_step(
        target,
        draft,
        pending,
        draft(pending[:, None], torch.ones(2, dtype=torch.long)),
        [SamplingParams(temperature=0)] * 2,
    )
    assert step.num_accepted.tolist() == [1, 0]
    assert step.num_committed.tolist() == [2, 1]
    assert step.tokens[0].tolist() == [int(nxt(torch.tensor(2))), int(nxt(nxt(torch.tensor(2))))]
    assert step.tokens[1, 0].item() == int(nxt(torch.tensor(3)))
    assert step.draft_logits.shape == (2, 1, V)


def test_rejection_rule_keeps_the_target_distribution():
    """p, q fixed and different: committed tokens follow p exactly; acceptance is sum_x min(p, q)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.1, 0.3, 0.2, 0.3])
    B = 200_000
    params = [SamplingParams(temperature=1.0)] * B
    drafts = torch.multinomial(q, B, replacement=True, generator=g)[:, None]
    target_logits = p.clamp_min(1e-30).log().expand(B, 2, 5)
    tokens, n_acc = accept(target_logits, drafts, q.expand(B, 1, 5), params, g)
    first = torch.bincount(tokens[:, 0], minlength=5).double() / B
    sigma = (p * (1 - p) / B).sqrt().double()
    assert ((first - p.double()).abs() <= 5 * sigma + 1e-9).all(), (first, p)
    rate = n_acc.double().mean()
    expected = torch.minimum(p, q).sum().double()
    assert abs(rate - expected) < 5 * (expected * (1 - expected) / B) ** 0.5
    bonus = tokens[n_acc == 1, 1]  # after an accepted draft, the bonus token is drawn from p
    freq = torch.bincount(bonus, minlength=5).double() / len(bonus)
    assert ((freq - p.double()).abs() <= 5 * (p * (1 - p) / len(bonus)).sqrt().double() + 1e-9).all()
    assert (tokens[:, 0] != 4).all()  # zero target probability is never committed


def test_identical_draft_is_always_accepted_when_sampling():
    B = 1000
    logits = torch.randn(B, 2, V)
    params = [SamplingParams(temperature=0.7, top_k=5)] * B
    from dsv3.inference.speculative import draft_tokens

    d, q = draft_tokens(logits[:, :1], params, torch.Generator().manual_seed(1))
    _, n_acc = accept(logits, d, q, params, torch.Generator().manual_seed(2))
    assert n_acc.eq(1).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(
            target,
            make_draft(1, "always"),
            torch.tensor([1]),
            torch.zeros(1, 1, V),
            [SamplingParams(temperature=0)],
            max_new_tokens=0,
        )
    with pytest.raises(ValueError, match="shape"):
        accept(
            torch.zeros(2, 3, V),
            torch.zeros(2, 1, dtype=torch.long),
            torch.zeros(2, 1, V),
            [SamplingParams(temperature=0)] * 2,
        )
