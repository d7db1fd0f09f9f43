"""Sampling: greedy, temperature, top-k, top-p, per-request seeds, parameter validation."""

import math

import pytest
import torch

from dsv3.inference.sampling import SamplingParams, filter_logits, probs_from_logits, sample


def test_greedy_is_argmax_and_draws_nothing():
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    out = sample(logits, [SamplingParams(temperature=0)] * 4, [g] * 4)
    assert torch.equal(out, logits.argmax(-1))
    assert torch.equal(g.get_state(), state)


def test_top_k_one_is_greedy_and_top_k_bounds_support():
    logits = torch.randn(1, 40).expand(3000, 40)
    g = torch.Generator().manual_seed(0)
    out = sample(logits, [SamplingParams(temperature=2.0, top_k=1)] * 3000, g)
    assert out.eq(logits[0].argmax()).all()
    out = sample(logits, [SamplingParams(temperature=5.0, top_k=3)] * 3000, g)
    assert set(out.tolist()) == set(logits[0].topk(3).indices.tolist())


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None]
    kept = lambda p: torch.isfinite(filter_logits(logits, [SamplingParams(top_p=p)]))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.8) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-6) == [True, False, False, False]  # at least one token stays


def test_temperature_gives_softmax_distribution():
    base = torch.tensor([1.0, 0.0, -1.0, 2.0])
    T, B = 0.7, 100_000
    out = sample(base.expand(B, 4), [SamplingParams(temperature=T)] * B, torch.Generator().manual_seed(1))
    freq = torch.bincount(out, minlength=4).double() / B
    p = (base / T).softmax(-1).double()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / B).sqrt()).all()


def test_mixed_batch_rows_are_independent_of_batch_composition():
    """A seeded row draws the same tokens alone or next to other (greedy and sampled) rows."""
    V, steps = 30, 20
    logits = torch.randn(steps, 3, V)
    p = SamplingParams(temperature=1.0, top_p=0.9)
    g_alone = torch.Generator().manual_seed(42)
    alone = [int(sample(logits[s, 1:2], [p], [g_alone])[0]) for s in range(steps)]
    gens = [None, torch.Generator().manual_seed(42), torch.Generator().manual_seed(7)]
    params = [SamplingParams(temperature=0), p, SamplingParams(temperature=1.3, top_k=4)]
    mixed = [sample(logits[s], params, gens) for s in range(steps)]
    assert [int(m[1]) for m in mixed] == alone
    assert [int(m[0]) for m in mixed] == logits[:, 0].argmax(-1).tolist()


def test_probs_from_logits_one_hot_for_greedy():
    logits = torch.randn(2, 9)
    probs = probs_from_logits(logits, [SamplingParams(temperature=0), SamplingParams(temperature=1.0)])
    assert probs[0].sum() == 1 and probs[0, logits[0].argmax()] == 1
    assert torch.allclose(probs[1], logits[1].softmax(-1))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_params_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw).validate()


def test_stop_string_is_listified():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
