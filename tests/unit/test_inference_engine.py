"""The engine on a real (debug-size, random) model: absorbed decode over the latent cache against a full
re-forward, continuous batching, seeds, stop rules, bad input, abort, and lossless MTP speculation."""

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.inference import LLM, Engine, SamplingParams
from dsv3.model import Transformer

GREEDY = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7], [3, 4, 9, 10, 11, 12, 13], [17] * 12, [8, 2, 100, 33, 4], [250, 251]]


class CharTokenizer:
    """One unicode character per token id, so text positions map onto tokens."""

    bos_id = None
    eos_id = None

    def encode(self, text):
        return [ord(c) - 0x100 for c in text]

    def decode(self, ids):
        return "".join(chr(0x100 + i) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    m = Transformer(cfg).eval()
    for g in m.moe_layers():  # a non-zero balance bias must be honoured at inference
        g.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


def run_all(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params[i] if isinstance(params, list) else params)
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.output
    return [outs[str(i)] for i in range(len(prompts))]


def test_absorbed_decode_equals_full_reforward_with_continuous_batching(model):
    """max_batch_size 2 < 5 requests of different lengths and budgets: requests leave and join; every
    decode step's logits equal a full forward over the whole sequence, and every prompt is prefilled once."""
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    records, prefilled = [], []
    decode, prefill = engine.runner.decode, engine.runner.prefill

    def rec_decode(tokens, starts):
        logits, h = decode(tokens, starts)
        ids = [r.out.request_id for r in engine.running[: tokens.shape[0]]]
        records.append((ids, starts.tolist(), logits[:, -1].clone()))
        return logits, h

    def rec_prefill(slot, prompts):
        prefilled.extend(map(tuple, prompts))
        return prefill(slot, prompts)

    engine.runner.decode, engine.runner.prefill = rec_decode, rec_prefill
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (9, 4, 7, 12, 5)]
    outs = run_all(engine, PROMPTS, params)
    assert sorted(prefilled) == sorted(map(tuple, PROMPTS))
    assert [len(o.token_ids) for o in outs] == [9, 4, 7, 12, 5]
    assert max(len(ids) for ids, _, _ in records) == 2
    with torch.no_grad():
        full = {
            str(i): model(torch.tensor([p + o.token_ids[:-1]])).logits[0]
            for i, (p, o) in enumerate(zip(PROMPTS, outs))
        }
    checked = 0
    for ids, starts, logits in records:
        for rid, pos, row in zip(ids, starts, logits):
            torch.testing.assert_close(row, full[rid][pos], rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == sum(len(o.token_ids) - 1 for o in outs)
    for p, o in zip(PROMPTS, outs):  # and the tokens are the greedy choices of the full forward
        ref = full[str(PROMPTS.index(p))][len(p) - 1 :].argmax(-1).tolist()
        assert o.token_ids == ref


def test_batched_equals_one_at_a_time(model):
    batched = run_all(Engine(model, max_batch_size=8, max_seq_len=64), PROMPTS, GREEDY)
    single = run_all(Engine(model, max_batch_size=1, max_seq_len=64), PROMPTS, GREEDY)
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    for o in batched:
        assert (
            o.finish_reason == "length"
            and o.time_to_first_token > 0
            and o.total_time >= o.time_to_first_token
        )


def test_seed_gives_same_output_whatever_the_batch(model):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run_all(Engine(model, max_batch_size=4, max_seq_len=64), [PROMPTS[1]], p)[0].token_ids
    others = [SamplingParams(max_new_tokens=5, temperature=0.8, seed=9, ignore_eos=True), GREEDY, p, GREEDY]
    mixed = run_all(
        Engine(model, max_batch_size=3, max_seq_len=64),
        [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]],
        others,
    )
    assert mixed[2].token_ids == alone
    unseeded = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    a, b = run_all(Engine(model, max_seq_len=64), [PROMPTS[1]] * 2, unseeded)
    assert a.token_ids != b.token_ids  # unseeded requests get different seeds


def test_stop_tokens_stop_strings_and_streaming(model):
    tok = CharTokenizer()
    llm = LLM(model, max_seq_len=64, tokenizer=tok)
    prompt = tok.decode(PROMPTS[1])
    ref = llm.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))[0]
    assert ref.text == tok.decode(ref.token_ids) and ref.prompt == prompt
    stop_id = ref.token_ids[5]
    cut = ref.token_ids.index(stop_id)
    o = llm.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[stop_id]))[0]
    assert o.token_ids == ref.token_ids[: cut + 1] and o.finish_reason == "stop"
    assert o.text == tok.decode(ref.token_ids[:cut])  # the stop token is not in the text
    stop = ref.text[6:8]
    o = llm.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0, stop=[stop, "\u9999"]))[0]
    assert o.finish_reason == "stop" and o.text == ref.text[: ref.text.find(stop)]
    # streamed deltas add up to the final text, and never show the stop string
    engine = llm.engine
    engine.add_request("s", prompt, SamplingParams(max_new_tokens=16, temperature=0, stop=[stop]))
    streamed = ""
    while engine.has_unfinished():
        for s in engine.step():
            streamed += s.new_text
    assert streamed == o.text


def test_eos_and_cache_length_limits(model):
    engine = Engine(model, max_seq_len=16)
    ref = run_all(engine, [PROMPTS[1]], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(ref.token_ids) == 16 - len(PROMPTS[1]) and ref.finish_reason == "length"
    eos_engine = Engine(model, max_seq_len=16)
    eos_engine.eos_ids = frozenset({ref.token_ids[2]})
    o = run_all(eos_engine, [PROMPTS[1]], SamplingParams(max_new_tokens=20, temperature=0))[0]
    assert (
        o.finish_reason == "stop"
        and o.token_ids == ref.token_ids[: ref.token_ids.index(ref.token_ids[2]) + 1]
    )


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], GREEDY, "empty prompt"),
        ("", GREEDY, "empty prompt"),
        (list(range(1, 33)), GREEDY, "max_seq_len"),
        ([1, 2], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(top_p=1.01), "top_p"),
        ([1, 999], GREEDY, "vocab_size"),
        ("text", GREEDY, "tokenizer"),
    ],
)
def test_bad_input_raises_and_engine_keeps_serving(model, prompt, params, match):
    engine = Engine(model, max_batch_size=4, max_seq_len=32)
    engine.tokenizer = CharTokenizer() if prompt == "" else None
    engine.add_request("good", PROMPTS[0], GREEDY)
    engine.step()
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, params)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", PROMPTS[1], GREEDY)
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o.output for o in engine.step() if o.finished})
    assert list(outs) == ["good"]
    ref = run_all(Engine(model, max_seq_len=32), [PROMPTS[0]], GREEDY)[0]
    assert outs["good"].token_ids == ref.token_ids


def test_llm_generate_rejects_bad_batch_atomically(model):
    llm = LLM(model, max_seq_len=32)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([PROMPTS[0], []], GREEDY)
    assert not llm.engine.has_unfinished()
    assert len(llm.generate([PROMPTS[0]], GREEDY)[0].token_ids) == GREEDY.max_new_tokens


def test_abort_frees_the_slot(model):
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    long = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    for i in range(3):
        engine.add_request(str(i), PROMPTS[i], long)
    engine.step()
    engine.step()
    assert engine.num_running() == 2
    assert engine.abort("0").finish_reason == "abort"
    assert engine.abort("nope") is None
    assert engine.num_running() == 1 and engine.cache.lengths[1] == 0
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o.output for o in engine.step() if o.finished})
    ref = run_all(Engine(model, max_seq_len=64), PROMPTS[1:3], long)
    assert [outs["1"].token_ids, outs["2"].token_ids] == [r.token_ids for r in ref]


def test_cache_bytes_per_token(model):
    cfg = model.config
    engine = Engine(model, max_seq_len=32)
    expected = (
        (cfg.num_hidden_layers + cfg.num_nextn_predict_layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    )
    assert engine.kv_cache_bytes_per_token == expected
    assert engine.cache.c.shape == (3, 8, 32, cfg.kv_lora_rank)


# ------------------------------------------------------------------------------------------- speculative
def test_speculative_with_real_mtp_is_lossless(model):
    llm = LLM(model, max_batch_size=3, max_seq_len=64)
    plain = llm.generate(PROMPTS, GREEDY)
    spec = llm.generate(PROMPTS, GREEDY, speculative=True)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    stats = llm.last_spec_stats
    assert (
        stats.drafted > 0
        and 0 <= stats.acceptance <= 1
        and stats.tokens == sum(len(o.token_ids) for o in spec)
    )
    assert all(o.spec is not None and o.tokens_per_forward >= 1 for o in spec)


def oracle_drafts(engine, refs, wrong_every):
    """Replace the MTP with an oracle that knows each request's greedy continuation but is wrong at
    positions divisible by wrong_every: the engine must still reproduce plain greedy decoding."""
    V = engine.config.vocab_size

    def guess(rid, index):
        seq = refs[rid]
        t = seq[index] if index < len(seq) else 0
        return (t + 1) % V if index % wrong_every == 0 else t

    def logits_for(tokens):
        return torch.nn.functional.one_hot(torch.tensor(tokens), V).float() * 5

    def mtp_prefill(slot, pre, next_tokens):
        n = pre.ids.shape[0]
        rows = [engine.running[slot + b].out.request_id for b in range(n)]
        return logits_for([[guess(r, int(pre.lengths[b]) + 1)] for b, r in enumerate(rows)])

    def mtp_decode(hidden, next_tokens, starts, last):
        n, S = next_tokens.shape
        rows = [r.out.request_id for r in engine.running[:n]]
        return logits_for([guess(r, int(starts[b]) + int(last[b]) + 2) for b, r in enumerate(rows)])

    engine.runner.mtp_prefill, engine.runner.mtp_decode = mtp_prefill, mtp_decode


SPEC_PARAMS = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (9, 4, 7, 12, 5)]


@pytest.fixture(scope="module")
def plain_outputs(model):
    return run_all(Engine(model, max_batch_size=2, max_seq_len=64), PROMPTS, SPEC_PARAMS)


@pytest.mark.parametrize("wrong_every, expect", [(10**9, 1.0), (1, 0.0), (3, None)])
def test_speculative_accept_and_rollback_is_lossless(model, plain_outputs, wrong_every, expect):
    params, plain = SPEC_PARAMS, plain_outputs
    refs = {str(i): p + o.token_ids for i, (p, o) in enumerate(zip(PROMPTS, plain))}
    engine = Engine(model, max_batch_size=2, max_seq_len=64, speculative=True)
    oracle_drafts(engine, refs, wrong_every)
    spec = run_all(engine, PROMPTS, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    acc = engine.spec_stats.acceptance
    if expect is not None:
        assert acc == expect
    else:
        assert 0.2 < acc < 0.9
    if expect == 1.0:
        assert engine.spec_stats.tokens_per_forward > 1.5


def test_speculative_sampling_runs_with_seeds(model):
    llm = LLM(model, max_batch_size=4, max_seq_len=64)
    p = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=5, ignore_eos=True)
    a = llm.generate(PROMPTS[:3], p, speculative=True)
    b = llm.generate(PROMPTS[:3], p, speculative=True)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(len(o.token_ids) == 12 for o in a)


def test_speculative_needs_mtp(model):
    cfg = model.config.replace(num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="MTP"):
        Engine(Transformer(cfg), speculative=True)


def test_mtp_drafts_equal_training_forward_mtp_logits(model):
    """The MTP cache layer is right: every draft (prefill and decode, after accepts and rejects) equals
    the MTP logits of one training-style forward over the final sequence at that position."""
    engine = Engine(model, max_batch_size=2, max_seq_len=64, speculative=True)
    records = []
    mtp_prefill, mtp_decode = engine.runner.mtp_prefill, engine.runner.mtp_decode

    def rec_prefill(slot, pre, next_tokens):
        out = mtp_prefill(slot, pre, next_tokens)
        for b in range(pre.ids.shape[0]):
            records.append((engine.running[slot + b].out.request_id, int(pre.lengths[b]) - 1, out[b, 0]))
        return out

    def rec_decode(hidden, next_tokens, starts, last):
        out = mtp_decode(hidden, next_tokens, starts, last)
        for b in range(next_tokens.shape[0]):
            records.append((engine.running[b].out.request_id, int(starts[b] + last[b]), out[b]))
        return out

    engine.runner.mtp_prefill, engine.runner.mtp_decode = rec_prefill, rec_decode
    outs = run_all(
        engine, PROMPTS[:3], SamplingParams(max_new_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
    )
    with torch.no_grad():
        full = {
            str(i): model(torch.tensor([p + o.token_ids]), with_mtp=True).mtp_logits[0][0]
            for i, (p, o) in enumerate(zip(PROMPTS, outs))
        }
    assert len(records) >= 3
    for rid, pos, logits in records:
        torch.testing.assert_close(logits, full[rid][pos], rtol=1e-4, atol=1e-4)


def test_fp8_model_decodes_consistently():
    """With FP8 GEMMs (emulated on CPU) the engine's absorbed decode still reproduces the FP8 model's
    own full forward, greedy token for greedy token."""
    torch.manual_seed(1)
    model = Transformer(ModelConfig.from_preset("debug")).eval()
    llm = LLM(model, max_seq_len=32, fp8=True)
    assert type(model.layers[0].attn.wkv_b).__name__ == "FP8Linear"
    out = llm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    seq = list(PROMPTS[1])
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.token_ids == seq[len(PROMPTS[1]) :]
