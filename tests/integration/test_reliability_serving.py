"""The server under abuse and shutdown, with real clients (and a real `dsv3 serve` process for SIGTERM):
413 before parsing, /health answering while a large prompt is tokenized, strict request types, the
prompt-count limit named, constant-time key from DSV3_API_KEY, /metrics behind the key, and a drain
that ends open streams with an error event and [DONE] within the graceful timeout."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

import httpx
import pytest
import torch

from dsv3 import ModelConfig, Transformer, save_pretrained
from dsv3.parallel.launch import free_port
from dsv3.serving import build_server, load_state
from dsv3.tokenizer import Tokenizer

KEY = "sk-reliability"
TEXT = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()
H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A debug model with 4096 positions whose EOS logit is 0 (greedy never stops early: long streams)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.from_preset("debug"), max_position_embeddings=4096).validate()
    tok = Tokenizer.train([TEXT[:60000]], cfg.vocab_size)
    model = Transformer(cfg)
    with torch.no_grad():
        model.head.weight[tok.eos_id] = 0
    out = tmp_path_factory.mktemp("model") / "m"
    save_pretrained(model, out, dtype=torch.float32, tokenizer=tok)
    return out


def _wait_healthy(base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")


@pytest.fixture(scope="module")
def server(model_dir):
    state = load_state(model_dir, api_key=KEY, max_batch_size=4, max_queue=4, max_body_bytes=1 << 20)
    port = free_port()
    srv = build_server(state, "127.0.0.1", port, graceful_timeout=2)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    _wait_healthy(base)
    yield base, state
    srv.should_exit = True
    thread.join(timeout=10)


def _post(base: str, body: dict | bytes, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**H, "Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(base + "/v1/completions", content=content, headers=headers, timeout=60, **kw)


def test_oversized_body_is_refused_unread(server):
    base, _ = server
    big = json.dumps({"prompt": "x" * (10 << 20), "max_tokens": 2}).encode()
    t0 = time.monotonic()
    r = _post(base, big)
    assert r.status_code == 413 and "limit is 1048576 bytes" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * (64 << 10)
        yield b'"}'

    r = httpx.post(
        base + "/v1/completions", content=chunks(), headers={**H, "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert _post(base, {"prompt": "To be", "max_tokens": 2}).status_code == 200  # still serving


def test_health_answers_while_a_large_prompt_is_tokenized(server):
    base, _ = server
    prompt = TEXT[:900_000]  # under the body limit, far over the context: ~0.7 s of tokenizing
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_post, base, {"prompt": prompt, "max_tokens": 2})
        time.sleep(0.1)
        worst = 0.0
        while not fut.done():
            t0 = time.monotonic()
            assert httpx.get(base + "/health", timeout=10).status_code == 200
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.02)
        r = fut.result()
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert worst < 0.5, f"/health took {worst:.2f}s while a prompt was tokenized"


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"prompt": "hi", "max_tokens": "4"}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 4.0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 2, "stream": "yes"}, "stream"),
        ({"prompt": "hi", "max_tokens": 2, "temperature": "0.5"}, "temperature"),
        ({"prompt": "hi", "max_tokens": 2, "seed": 2**70}, "seed"),
        ({"prompt": "hi", "max_tokens": 2, "seed": -1}, "seed"),
        ({"prompt": [[1, 2]] * 100, "max_tokens": 2}, "at most 8"),
        ({"prompt": list(range(3, 300)) * 20, "max_tokens": 2}, "max_seq_len"),
    ],
)
def test_strict_inputs(server, body, fragment):
    r = _post(server[0], body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"], r.text


def test_many_prompts_within_the_limit_are_served(server):
    r = _post(server[0], {"prompt": [f"To be {i}" for i in range(8)], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8


def test_metrics_behind_the_key_when_asked(server):
    base, state = server
    assert httpx.get(base + "/metrics").status_code == 200  # open by default, as vLLM
    state.protect_metrics = True
    try:
        assert httpx.get(base + "/metrics").status_code == 401
        assert httpx.get(base + "/metrics", headers=H).status_code == 200
    finally:
        state.protect_metrics = False
    assert state.key_ok(f"Bearer {KEY}") and not state.key_ok(f"Bearer {KEY}x") and not state.key_ok("")


def _stream_lines(base: str, out: list[str], started: threading.Event) -> None:
    body = {"prompt": "To be", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=H, timeout=60) as r:
        for line in r.iter_lines():
            if line:
                out.append(line)
                started.set()


def test_sigterm_drains_streams_with_an_error_event_and_done(model_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DSV3_API_KEY": KEY}
    cmd = [sys.executable, "-m", "dsv3.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--graceful-timeout", "1", "--max-batch-size", "4"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(base)
        ok = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=H)
        assert ok.status_code == 200  # the key from the environment
        assert httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 401
        assert KEY not in " ".join(cmd)
        outs: list[list[str]] = [[] for _ in range(4)]
        events = [threading.Event() for _ in range(4)]
        threads = [threading.Thread(target=_stream_lines, args=(base, o, e)) for o, e in zip(outs, events)]
        for t in threads:
            t.start()
        for e in events:
            assert e.wait(30)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=10)
        p.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
        log = p.communicate()[0]
    assert took < 1 + 1 + 1.0, (took, log)  # the graceful timeout, plus a second, plus slack for a busy CPU
    for lines in outs:
        assert lines[-1] == "data: [DONE]", lines[-3:]
        err = json.loads(lines[-2][len("data: ") :])
        assert err["error"]["code"] == "shutting_down", lines[-2]
        assert len(lines) > 3  # tokens were streamed before the drain ended it


def test_non_finite_weights_are_named_at_load(tmp_path):
    from dsv3.checkpoint import from_pretrained

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("debug"))
    with torch.no_grad():
        model.layers[0].attn.wq_a.weight[0, :3] = float("nan")
        model.norm.weight[1] = float("inf")
    save_pretrained(model, tmp_path / "m", dtype=torch.float32)
    with pytest.warns(UserWarning, match=r"non-finite weights .* in 2 tensor\(s\)") as rec:
        from_pretrained(tmp_path / "m")
    msg = str(rec[0].message)
    assert "model.layers.0.self_attn.q_a_proj.weight (3 of" in msg and "model.norm.weight (1 of" in msg
