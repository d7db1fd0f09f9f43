"""OpenAI API fields on a live server (debug model, fp32) through the real `openai` client: logprobs and
top_logprobs, echo, max_tokens=0 scoring, n / best_of with seeds, logit_bias, penalties, stop lists,
streaming with logprobs, and 400s for recognised-but-unsupported fields."""

from __future__ import annotations

from importlib import resources

import httpx
import openai
import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.inference import LLM
from dsv3.serving import load_state
from dsv3.tokenizer import Tokenizer

API_KEY = "sk-test"
MODEL = "dsv3-debug"
TEXT = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:30000]


@pytest.fixture(scope="module")
def server(serve_in_thread):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    tok = Tokenizer.train([TEXT], cfg.vocab_size)
    model = Transformer(cfg).eval()
    llm = LLM(model, tokenizer=tok, max_batch_size=8, max_seq_len=96, dtype="fp32")
    state = load_state(llm, model_name=MODEL, api_key=API_KEY, max_queue=32)
    with serve_in_thread(state) as base:
        yield base, model, tok


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def _ref_logp(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _greedy(model, prompt, steps, frequency=0.0, presence=0.0):
    """Reference greedy decoding by full forwards, with OpenAI's penalties over the generated tokens:
    (generated ids, raw log-softmax at each step [steps, V])."""
    gen, rows, counts = [], [], {}
    for _ in range(steps):
        logp = _ref_logp(model, prompt + gen)[-1]
        adj = logp.clone()
        for j, c in counts.items():
            adj[j] -= frequency * c + presence
        t = int(adj.argmax())
        gen.append(t)
        rows.append(logp)
        counts[t] = counts.get(t, 0) + 1
    return gen, torch.stack(rows)


def test_completion_logprobs_are_the_raw_model_ones(server, client):
    _, model, tok = server
    prompt = tok.encode("ROMEO: what")
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, seed=3)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    gen, ref = _greedy(model, prompt, 5)
    assert lp.tokens == [tok.decode([t]) for t in gen]
    want = ref.gather(1, torch.tensor(gen)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.token_logprobs), want, atol=1e-4)
    for step, top in enumerate(lp.top_logprobs):
        assert 1 <= len(top) <= 4 and lp.tokens[step] in top  # byte tokens may share the string U+FFFD
        assert list(top.values()) == sorted(top.values(), reverse=True)
        assert max(top.values()) == pytest.approx(float(ref[step].max()), abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    # at a temperature the logprobs stay raw (no temperature in them): the same call at 0.8 scores its
    # tokens as the model does; the greedy run's first token scores the same at any temperature
    hot = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0.8, logprobs=1, logit_bias={str(gen[0]): 100}
    )
    assert hot.choices[0].logprobs.token_logprobs[0] == pytest.approx(float(want[0]), abs=1e-4)


def test_echo_and_max_tokens_zero_score_the_prompt(server, client):
    _, model, tok = server
    text = "To be, or not to be"
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == text and c.finish_reason == "length"
    ids = [tok.bos_id, *tok.encode(text)]  # the engine puts BOS in front of a text prompt
    lp = c.logprobs
    assert (
        lp.tokens[0] == tok.decode([tok.bos_id])
        and lp.token_logprobs[0] is None
        and lp.top_logprobs[0] is None
    )
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens[1:]) == text
    assert lp.text_offset[:2] == [0, 0]  # BOS takes no characters of the echoed text
    want = _ref_logp(model, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-4)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    # token-id prompts are echoed as sent; with generation the completion follows the prompt
    r2 = client.completions.create(
        model=MODEL, prompt=ids[1:], max_tokens=2, echo=True, logprobs=0, temperature=0
    )
    lp2 = r2.choices[0].logprobs
    assert len(lp2.tokens) == len(ids) - 1 + 2 and lp2.token_logprobs[0] is None
    want2 = _ref_logp(model, ids[1:])[:-1].gather(1, torch.tensor(ids[2:])[:, None])[:, 0]  # no BOS here
    assert torch.allclose(torch.tensor(lp2.token_logprobs[1 : len(ids) - 1]), want2, atol=1e-4)
    assert r2.choices[0].text.startswith(text)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt=text, max_tokens=0)


def test_n_samples_distinct_with_seed_identical_greedy(server, client):
    kw = dict(model=MODEL, prompt="KING:", max_tokens=8)
    r = client.completions.create(n=4, temperature=1.0, seed=7, **kw)
    texts = [c.text for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and len(set(texts)) > 1
    again = client.completions.create(n=4, temperature=1.0, seed=7, **kw)
    assert [c.text for c in again.choices] == texts  # reproducible
    counted = client.completions.create(n=4, temperature=1.0, seed=7, logprobs=0, **kw)
    assert counted.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in counted.choices)
    assert counted.usage.prompt_tokens == 1 + len(server[2].encode("KING:"))  # BOS + prompt, once for n=4
    g = client.completions.create(n=4, temperature=0, **kw)
    assert len({c.text for c in g.choices}) == 1
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3, max_tokens=6, temperature=1.0, seed=1
    )
    assert len(chat.choices) == 3 and len({c.message.content for c in chat.choices}) > 1


def test_best_of_returns_the_most_likely(client):
    kw = dict(model=MODEL, prompt="KING:", max_tokens=6, temperature=1.0, seed=5)
    every = client.completions.create(n=4, logprobs=0, **kw)
    scores = {c.text: sum(c.logprobs.token_logprobs) for c in every.choices}
    best = client.completions.create(n=2, best_of=4, logprobs=0, **kw)
    got = [c.text for c in best.choices]
    assert got == sorted(scores, key=lambda t: -scores[t])[:2]
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(n=2, best_of=4, stream=True, **kw)


def test_logit_bias_forces_a_token(server, client):
    _, _, tok = server
    target = tok.encode(" love")[0]
    r = client.completions.create(
        model=MODEL,
        prompt="KING:",
        max_tokens=4,
        temperature=1.0,
        seed=2,
        logit_bias={str(target): 100},
        logprobs=0,
    )
    assert r.choices[0].text == tok.decode([target] * 4)
    assert all(v < 0 for v in r.choices[0].logprobs.token_logprobs)  # raw: the model's, not the biased ones


def test_penalties_follow_openais_definition(server, client):
    """Greedy with frequency/presence penalties: each token is the argmax of the raw logits minus
    c * frequency_penalty + (c > 0) * presence_penalty over the tokens generated so far."""
    _, model, tok = server
    prompt = tok.encode("the the the the")
    kw = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=0)
    pen = client.completions.create(frequency_penalty=1.5, presence_penalty=0.5, **kw).choices[0]
    gen, ref = _greedy(model, prompt, 8, frequency=1.5, presence=0.5)
    plain, _ = _greedy(model, prompt, 8)
    assert gen != plain  # the penalties change what is generated here
    assert pen.logprobs.tokens == [tok.decode([t]) for t in gen]
    want = ref.gather(1, torch.tensor(gen)[:, None])[:, 0]  # logprobs stay raw
    assert torch.allclose(torch.tensor(pen.logprobs.token_logprobs), want, atol=1e-4)
    neg = client.completions.create(frequency_penalty=-2.0, **kw).choices[0]
    assert neg.logprobs.tokens == [tok.decode([t]) for t in _greedy(model, prompt, 8, frequency=-2.0)[0]]


def test_stop_list(client):
    kw = dict(model=MODEL, prompt="KING:", max_tokens=20, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert len(full) > 6
    stops = [full[4:6], "\u9999zz"]
    r = client.completions.create(stop=stops, **kw).choices[0]
    assert r.finish_reason == "stop" and r.text == full[: full.find(full[4:6])]
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(stop=["a", "b", "c", "d", "e"], **kw)


def test_chat_logprobs_layout(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Speak"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the chosen token is the argmax
        assert isinstance(e.bytes, list)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, top_logprobs=2
        )


def test_streaming_logprobs_match_nonstream(client):
    kw = dict(model=MODEL, prompt="KING:", max_tokens=6, temperature=0, logprobs=2, n=2)
    full = client.completions.create(**kw)
    toks: dict[int, list[str]] = {0: [], 1: []}
    lps: dict[int, list[float]] = {0: [], 1: []}
    for ch in client.completions.create(stream=True, **kw):
        for c in ch.choices:
            if c.logprobs is not None:
                toks[c.index] += c.logprobs.tokens
                lps[c.index] += c.logprobs.token_logprobs
    for c in full.choices:
        assert toks[c.index] == c.logprobs.tokens
        assert lps[c.index] == pytest.approx(c.logprobs.token_logprobs, abs=1e-6)


@pytest.mark.parametrize(
    "endpoint, extra, name",
    [
        ("completions", {"suffix": "x"}, "suffix"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat", {"tool_choice": "auto"}, "tool_choice"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"functions": [{"name": "f"}]}, "functions"),
        ("chat", {"parallel_tool_calls": False}, "parallel_tool_calls"),
        ("chat", {"modalities": ["text", "audio"]}, "modalities"),
        ("chat", {"logprobs": 3}, "logprobs"),
    ],
)
def test_unsupported_fields_get_400(server, endpoint, extra, name):
    base = server[0]
    if endpoint == "chat":
        url, body = "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    else:
        url, body = "/v1/completions", {"model": MODEL, "prompt": "x"}
    h = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(base + url, json={**body, "max_tokens": 2, **extra}, headers=h, timeout=30)
    assert r.status_code == 400, r.text
    assert name in r.json()["error"]["message"]
    ok = httpx.post(
        base + url, json={**body, "max_tokens": 2, "response_format": {"type": "text"}}, headers=h
    )
    assert ok.status_code == 200, ok.text  # a no-op value is accepted
    bad = httpx.post(base + url, json={**body, "max_tokens": 2}, headers={"Authorization": "Bearer sk-wrong"})
    assert bad.status_code == 401  # the key is still checked (hmac.compare_digest)


def test_streaming_echo_and_chat_logprobs(client):
    kw = dict(model=MODEL, prompt="KING:", max_tokens=4, temperature=0, echo=True, logprobs=1)
    full = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == full.text
    streamed = [t for c in chunks if c.logprobs is not None for t in c.logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(full.logprobs.token_logprobs[1:], abs=1e-6)
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == full.logprobs.text_offset
    ckw = dict(model=MODEL, messages=[{"role": "user", "content": "Speak"}], max_tokens=4, temperature=0)
    cfull = client.chat.completions.create(logprobs=True, top_logprobs=1, **ckw).choices[0].logprobs.content
    cstream = [
        e.logprob
        for ch in client.chat.completions.create(stream=True, logprobs=True, top_logprobs=1, **ckw)
        for c in ch.choices
        if c.logprobs is not None
        for e in c.logprobs.content
    ]
    assert cstream == pytest.approx([e.logprob for e in cfull], abs=1e-6)
