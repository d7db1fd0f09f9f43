"""Log-probabilities, logit_bias and OpenAI's penalties in the engine (SamplingParams.logprobs,
prompt_logprobs, logit_bias, presence/frequency_penalty), against a plain full forward of the model."""

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.inference import LLM, SamplingParams
from dsv3.inference.sampling import adjust_logits, top_logprobs
from dsv3.model import Transformer

PROMPTS = [[5, 6, 7], [3, 4, 9, 10, 11, 12, 13, 40, 41], [17] * 5, [250, 251]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("debug")).eval()


def _ref_logp(model, ids):
    """log_softmax of a plain full forward (fp32) at every position: [T, V]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_prompt_logprobs_equal_a_full_forward_batched(model):
    llm = LLM(model, max_batch_size=4, max_seq_len=32)
    params = [SamplingParams(max_new_tokens=0, prompt_logprobs=k) for k in (0, 3, 1, 5)]
    outs = llm.generate(PROMPTS, params)  # different lengths, one prefill batch
    for p, k, o in zip(PROMPTS, (0, 3, 1, 5), outs):
        assert o.finished and o.finish_reason == "length" and o.token_ids == [] and o.logprobs is None
        ref = _ref_logp(model, p)
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
        want = ref[:-1].gather(1, torch.tensor(p[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.prompt_logprobs[1:]), want, atol=1e-5, rtol=0)
        if k == 0:
            assert o.prompt_top_logprobs is None
            continue
        assert o.prompt_top_logprobs[0] is None
        for i, d in enumerate(o.prompt_top_logprobs[1:]):
            top = ref[i].topk(k)
            assert list(d)[:k] == top.indices.tolist()  # ties aside, the top k lead in order
            assert p[i + 1] in d and len(d) in (k, k + 1)
            vals = list(d.values())
            assert vals == sorted(vals, reverse=True)


def test_generated_raw_logprobs_equal_the_reference_at_temperature(model):
    llm = LLM(model, max_batch_size=4, max_seq_len=32)
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=11, ignore_eos=True, logprobs=4)
    outs = llm.generate(PROMPTS[:3], params)
    for p, o in zip(PROMPTS[:3], outs):
        ref = _ref_logp(model, p + o.token_ids)[len(p) - 1 : -1]  # raw: no temperature
        want = ref.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.logprobs), want, atol=1e-5, rtol=0)
        assert o.cumulative_logprob == pytest.approx(sum(o.logprobs), abs=1e-6)
        assert len(o.top_logprobs) == len(o.token_ids)
        for step, (d, t) in enumerate(zip(o.top_logprobs, o.token_ids)):
            vals = list(d.values())
            assert vals == sorted(vals, reverse=True) and t in d
            assert next(iter(d)) == int(ref[step].argmax())  # the argmax leads the dict
            assert set(ref[step].topk(4).indices.tolist()) <= set(d)
    (plain,) = llm.generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=6, temperature=0.7, seed=11, ignore_eos=True)
    )
    assert plain.token_ids == outs[0].token_ids and plain.logprobs is None  # recording changes no draw


def test_processed_logprobs_are_the_tempered_policy(model):
    llm = LLM(model, max_batch_size=2, max_seq_len=32)
    params = SamplingParams(
        max_new_tokens=4, temperature=0.7, seed=2, ignore_eos=True, logprobs=0, logprobs_mode="processed"
    )
    (o,) = llm.generate([PROMPTS[1]], params)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[1] + o.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits / 0.7, -1)[len(PROMPTS[1]) - 1 : -1]
    want = ref.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(o.logprobs), want, atol=1e-5) and o.top_logprobs is None


def test_logit_bias_forces_a_token(model):
    llm = LLM(model, max_batch_size=2, max_seq_len=32)
    for temp in (0.0, 1.0):
        p = SamplingParams(max_new_tokens=5, temperature=temp, seed=3, ignore_eos=True, logit_bias={77: 100})
        (o,) = llm.generate([PROMPTS[0]], p)
        assert o.token_ids == [77] * 5
    p = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    (g,) = llm.generate([PROMPTS[0]], p)
    banned = SamplingParams(
        max_new_tokens=5, temperature=0, ignore_eos=True, logit_bias={g.token_ids[0]: -100}
    )
    (b,) = llm.generate([PROMPTS[0]], banned)
    assert b.token_ids[0] != g.token_ids[0]


def test_penalties_follow_openais_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),
        SamplingParams(frequency_penalty=-1.0, logit_bias={2: 3.0}),
    ]
    generated = [[4, 4, 4, 7], [1, 2], [2, 2]]
    out = adjust_logits(logits, params, generated)
    want = logits.clone()
    want[0, 4] -= 3 * 0.25 + 0.5
    want[0, 7] -= 1 * 0.25 + 0.5
    want[2, 2] += 3.0 + 2 * 1.0
    assert torch.equal(out, want)
    assert torch.equal(adjust_logits(logits, [SamplingParams()] * 3, generated), logits)


def test_frequency_penalty_changes_the_engine_logits(model):
    """The engine samples from adjust_logits of its generated tokens: a greedy run with a huge frequency
    penalty never repeats a token; logprobs stay raw (the model's), unaffected by the penalty."""
    llm = LLM(model, max_batch_size=2, max_seq_len=32)
    base = dict(max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    (o,) = llm.generate([[17] * 5], SamplingParams(**base, frequency_penalty=2.0, presence_penalty=2.0))
    ref = _ref_logp(model, [17] * 5 + o.token_ids)[4:-1]
    counts: dict[int, int] = {}
    for i, t in enumerate(o.token_ids):
        adj = ref[i].clone()
        for j, c in counts.items():
            adj[j] -= 2.0 * c + 2.0
        assert t == int(adj.argmax())
        counts[t] = counts.get(t, 0) + 1
    assert torch.allclose(
        torch.tensor(o.logprobs), ref.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0], atol=1e-5
    )


def test_top_logprobs_adds_the_chosen_token():
    logp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), -1)
    chosen, tops = top_logprobs(logp, torch.tensor([3]), [2])
    assert list(tops[0]) == [0, 1, 3] and chosen[0] == pytest.approx(float(logp[0, 3]))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"logprobs_mode": "tempered"}, "logprobs_mode"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logit_bias": {3: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw).validate()


def test_engine_rejects_out_of_vocab_bias_and_speculative_extras(model):
    llm = LLM(model, max_batch_size=2, max_seq_len=32)
    with pytest.raises(ValueError, match="vocab_size"):
        llm.generate([[1, 2]], SamplingParams(logit_bias={10**6: 1.0}))
    if llm.engine.runner.has_mtp:
        with pytest.raises(ValueError, match="speculative"):
            llm.generate([[1, 2]], SamplingParams(logprobs=1), speculative=True)
