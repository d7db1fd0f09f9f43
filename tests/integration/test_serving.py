"""The OpenAI-compatible server, started on 127.0.0.1 with a tiny random model, driven by real clients."""

from __future__ import annotations

import concurrent.futures
import json
import time
from importlib import resources

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv3 import ModelConfig, Transformer
from dsv3.inference import LLM
from dsv3.serving import load_state
from dsv3.tokenizer import Tokenizer

API_KEY = "sk-test"
TEXT = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:60000]


@pytest.fixture(scope="module")
def server(serve_in_thread):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    tok = Tokenizer.train([TEXT], cfg.vocab_size)
    model = Transformer(cfg)
    llm = LLM(model, tokenizer=tok, max_batch_size=8, max_seq_len=128, dtype="fp32")
    state = load_state(llm, model_name="dsv3-debug", api_key=API_KEY, max_queue=32)
    with serve_in_thread(state) as base:
        yield base, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def test_completions_stream_equals_nonstream(client):
    kw = dict(model="dsv3-debug", prompt="To be, or not", max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason in ("length", "stop")
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens >= 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == full.choices[0].text


def test_chat_stream_equals_nonstream(client):
    kw = dict(
        model="dsv3-debug",
        messages=[{"role": "user", "content": "Whether 'tis nobler"}],
        max_tokens=10,
        temperature=0,
    )
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    parts = []
    for c in client.chat.completions.create(stream=True, **kw):
        if c.choices and c.choices[0].delta.content:
            parts.append(c.choices[0].delta.content)
    assert "".join(parts) == msg.content


def test_models_health_metrics(server, client):
    base, _ = server
    assert [m.id for m in client.models.list().data] == ["dsv3-debug"]
    assert httpx.get(base + "/health").json()["status"] == "ok"
    text = httpx.get(base + "/metrics").text
    families = _parse_prometheus(text)
    for name in (
        "dsv3_requests_total",
        "dsv3_generation_tokens_total",
        "dsv3_queue_depth",
        "dsv3_running_batch_size",
        "dsv3_time_to_first_token_seconds",
        "dsv3_inter_token_latency_seconds",
        "dsv3_spec_decode_acceptance_rate",
    ):
        assert name in families, name


def _parse_prometheus(text: str) -> dict[str, str]:
    """A strict-enough parser: every sample line is `name{labels} value` with a declared family."""
    families: dict[str, str] = {}
    for line in text.strip().splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            families[name] = kind
        elif line.startswith("#"):
            continue
        else:
            name_part, value = line.rsplit(" ", 1)
            float(value)
            base = name_part.split("{")[0]
            fam = next((f for f in families if base == f or base.startswith(f + "_")), None)
            assert fam is not None, f"sample {base} has no TYPE line"
    return families


def test_concurrent_streams_match_solo(client):
    prompts = [f"To be {i}" for i in range(16)]
    solo = {
        p: client.completions.create(model="dsv3-debug", prompt=p, max_tokens=8, temperature=0)
        .choices[0]
        .text
        for p in prompts[:4]
    }

    def stream(p: str) -> str:
        return "".join(
            c.choices[0].text
            for c in client.completions.create(
                model="dsv3-debug", prompt=p, max_tokens=8, temperature=0, stream=True
            )
            if c.choices
        )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outs = dict(zip(prompts, pool.map(stream, prompts)))
    assert len(outs) == 16
    for p, text in solo.items():
        assert outs[p] == text


BAD = [
    # (headers, body or raw string, status, message fragment)
    ({}, "{not json", 400, "parse the JSON"),
    ({}, {"model": "dsv3-debug"}, 400, "prompt"),
    ({}, {"model": "dsv3-debug", "prompt": "hi", "max_tokens": "lots"}, 400, "max_tokens"),
    ({}, {"model": "dsv3-debug", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({}, {"model": "dsv3-debug", "prompt": "hi", "max_tokens": 100000}, 400, "maximum context length"),
    ({}, {"model": "dsv3-debug", "prompt": "word " * 400, "max_tokens": 4}, 400, "max_seq_len"),
    ({}, {"model": "dsv3-debug", "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({}, {"model": "dsv3-debug", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({}, {"model": "dsv3-debug", "prompt": "hi", "n": 3, "best_of": 2}, 400, "best_of"),
    ({}, {"model": "dsv3-debug", "prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ({}, {"model": "dsv3-debug", "prompt": ""}, 400, "empty"),
    ({}, {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ({"Authorization": "Bearer wrong"}, {"model": "dsv3-debug", "prompt": "hi"}, 401, "Incorrect API key"),
    ({"Authorization": ""}, {"model": "dsv3-debug", "prompt": "hi"}, 401, "API key"),
]


@pytest.mark.parametrize("headers,body,status,fragment", BAD)
def test_bad_requests(server, headers, body, status, fragment):
    base, _ = server
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers}
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(base + "/v1/completions", content=data, headers=h, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and "type" in err


def test_bad_chat_messages(server):
    base, _ = server
    h = {"Authorization": f"Bearer {API_KEY}"}
    for body in (
        {"model": "dsv3-debug", "messages": []},
        {"model": "dsv3-debug", "messages": [{"role": "x"}]},
        {"model": "dsv3-debug", "messages": "hello"},
    ):
        r = httpx.post(base + "/v1/chat/completions", json=body, headers=h, timeout=30)
        assert r.status_code == 400, r.text
        assert "error" in r.json()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["dsv3-debug", "other"]) | json_values,
        "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 400), max_size=5) | json_values,
        "max_tokens": st.integers(-3, 300) | json_values,
        "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
        "top_p": st.floats(-0.5, 1.5, allow_nan=False) | json_values,
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | json_values,
        "seed": st.integers(-5, 2**40) | json_values,
        "n": st.integers(0, 3),
        "stream": st.booleans(),
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=fields)
def test_fuzz_never_5xx(server, body):
    base, _ = server
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 4)
    else:
        body.setdefault("max_tokens", 2)
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    r = httpx.post(
        base + "/v1/completions", content=json.dumps(body), headers=h, timeout=60
    )  # NaN/Infinity too
    assert r.status_code < 500, (body, r.text)


def test_disconnect_cancels(server):
    base, state = server
    h = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "dsv3-debug", "prompt": "To be", "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=h, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # got the first token: hang up
    deadline = time.time() + 10
    while time.time() < deadline and (state.engine.in_flight() or state.core.has_unfinished()):
        time.sleep(0.05)
    assert state.engine.in_flight() == 0 and not state.core.has_unfinished()
    assert state.core.cache.lengths[0] == 0


def test_queue_full_gets_429(server):
    base, state = server
    eng = state.engine
    old = eng.max_queue
    eng.max_queue = -eng.engine.max_batch_size  # capacity 0: every request is over the limit
    try:
        r = httpx.post(
            base + "/v1/completions",
            json={"model": "dsv3-debug", "prompt": "hi", "max_tokens": 2},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
    finally:
        eng.max_queue = old
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
