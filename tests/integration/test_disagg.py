"""Prefill/decode disaggregation: worker processes behind the engine interface and the OpenAI server.

One set of workers (2 prefill + 2 decode processes, debug model, fp32) serves the whole module, in order:
outputs equal to the colocated engine (greedy and seeded sampling), abort, a prefill worker killed with a
request in it, then the server over the same engine, and a decode worker killed mid-stream.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from importlib import resources

import httpx
import openai
import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.cli import build_parser
from dsv3.inference import Engine, SamplingParams
from dsv3.inference.disagg import DisaggEngine
from dsv3.serving import load_state
from dsv3.tokenizer import Tokenizer

TEXT = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:60000]
PROMPTS = ["To be, or not", "Whether 'tis nobler in the mind", [5, 6, 7], [17] * 12, "First Citizen:", [9, 8]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
MAX_SEQ = 320


def _run(engine, prompts, params, prefix="r"):
    ids = [f"{prefix}{i}" for i in range(len(prompts))]
    for rid, p, sp in zip(ids, prompts, params if isinstance(params, list) else [params] * len(prompts)):
        engine.add_request(rid, p, sp)
    outs, seen, deadline = {}, set(), time.monotonic() + 60
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "disaggregated engine hung"
        for o in engine.step():
            seen.add(engine.location(o.request_id) if hasattr(engine, "location") else None)
            if o.finished:
                outs[o.request_id] = o.output
    return [outs[r] for r in ids], seen


def _tracked(de: DisaggEngine) -> list:
    """The engine's tracked requests, read from another thread than the one stepping it."""
    while True:
        try:
            return list(de.requests.values())
        except RuntimeError:  # changed size during iteration
            continue


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def setup():
    # One thread for the in-process reference engine: on a tiny model it is as fast as two, and two OpenMP
    # threads on an oversubscribed 2-core CPU can be 100x slower (they wait on each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    tok = Tokenizer.train([TEXT], cfg.vocab_size)
    model = Transformer(cfg).eval()
    for g in model.moe_layers():  # a non-zero balance bias must reach the workers too
        g.gate.e_score_correction_bias.normal_(0, 0.05)
    ref = Engine(model, tok, max_batch_size=8, max_seq_len=MAX_SEQ)
    state = load_state(
        model,
        tokenizer=tok,
        model_name="dsv3-debug",
        max_batch_size=4,
        max_seq_len=MAX_SEQ,
        disaggregate=True,
        prefill_workers=2,
        decode_workers=2,
    )
    yield ref, state
    state.core.close(timeout=5)
    torch.set_num_threads(threads)


def test_outputs_equal_colocated_engine(setup):
    ref, state = setup
    de = state.core
    assert isinstance(de, DisaggEngine) and de.max_batch_size == 8 and de.max_seq_len == MAX_SEQ
    assert de.kv_cache_bytes_per_token == ref.kv_cache_bytes_per_token
    want, _ = _run(ref, PROMPTS, GREEDY)
    got, seen = _run(de, PROMPTS, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    stop = SamplingParams(max_new_tokens=12, temperature=0, stop=[want[0].text[4:6]])
    assert all(o.finish_reason == "length" and o.time_to_first_token > 0 for o in got)
    assert {("decode", 0), ("decode", 1)} <= seen  # the batch was spread over both decode workers
    # seeded sampling continues the prefill worker's generator on the decode worker: same draws
    sampled = [
        SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=i) for i in range(len(PROMPTS))
    ]
    want, _ = _run(ref, PROMPTS, sampled)
    got, _ = _run(de, PROMPTS, sampled, prefix="s")
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # stop strings and a request finished by its first token (never reaches a decode worker)
    one = SamplingParams(max_new_tokens=1, temperature=0)
    want, _ = _run(ref, PROMPTS[:2], [stop, one])
    got, _ = _run(de, PROMPTS[:2], [stop, one], prefix="t")
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [
        (o.token_ids, o.text, o.finish_reason) for o in want
    ]
    assert not de.has_unfinished() and de.num_running() == 0 and not de.waiting


def test_abort_and_bad_input(setup):
    _, state = setup
    de = state.core
    with pytest.raises(ValueError, match="max_seq_len"):
        de.add_request("long", [1] * MAX_SEQ)
    with pytest.raises(ValueError, match="temperature"):
        de.add_request("bad", [1, 2], SamplingParams(temperature=-1))
    de.add_request("a", [1, 2, 3], SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        de.add_request("a", [4])
    deadline = time.monotonic() + 30
    while de.num_running() == 0:  # wait until it is decoding
        assert time.monotonic() < deadline
        de.step()
    assert de.abort("a").finish_reason == "abort" and de.abort("a") is None
    assert not de.has_unfinished()
    got, _ = _run(de, PROMPTS[:1], GREEDY, prefix="after-abort")
    assert len(got[0].token_ids) == GREEDY.max_new_tokens


def test_dead_prefill_worker_fails_its_requests_only(setup):
    ref, state = setup
    de = state.core
    de.add_request("doomed", PROMPTS[1], GREEDY)
    role, k = de.location("doomed")
    assert role == "prefill"
    _kill(de.workers[k].process.pid)
    de.add_request("other", PROMPTS[0], GREEDY)  # routed to the live prefill worker
    outs, deadline = {}, time.monotonic() + 30
    while de.has_unfinished():
        assert time.monotonic() < deadline
        outs.update({o.request_id: o for o in de.step() if o.finished})
    assert outs["doomed"].finish_reason == "error"
    assert f"prefill worker {k}" in outs["doomed"].output.error and "died" in outs["doomed"].output.error
    want, _ = _run(ref, PROMPTS, GREEDY)
    assert outs["other"].output.token_ids == want[0].token_ids
    got, _ = _run(de, PROMPTS, GREEDY, prefix="after-kill")  # new requests keep being served
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [w.alive for w in de.workers if w.role == "prefill"].count(True) == 1


@pytest.fixture(scope="module")
def server(setup, serve_in_thread):
    _, state = setup
    with serve_in_thread(state) as base:
        yield base


def test_server_streams_like_colocated(setup, server):
    ref, _ = setup
    client = openai.OpenAI(base_url=server + "/v1", api_key="-", max_retries=0)
    kw = dict(model="dsv3-debug", prompt="To be, or not", max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    want, _ = _run(ref, ["To be, or not"], SamplingParams(max_new_tokens=12, temperature=0))
    assert full.choices[0].text == streamed == want[0].text


def test_dead_decode_worker_fails_its_stream_others_finish(setup, server):
    _, state = setup
    de = state.core
    results: dict[int, tuple[str, str]] = {}
    together = threading.Barrier(2)  # both requests leave at once, so their decodes overlap

    def stream(i: int) -> None:
        body = {
            "model": "dsv3-debug",
            "prompt": [5 + i, 6, 7],
            "max_tokens": MAX_SEQ - 4,  # as long as the cache allows: the two streams must overlap
            "temperature": 0,
            "stream": True,
        }
        text, last = "", ""
        together.wait(timeout=30)
        try:
            with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    last = line or last
                    text += line + "\n"
        except httpx.HTTPError as e:
            text += repr(e)
        results[i] = (text, last)

    def overlapping() -> list[threading.Thread] | None:
        """Start the two streams; their threads once both decode at once, None if they did not overlap
        (on a busy machine one can finish its 316 tokens before the other's prefill is done)."""
        nonlocal together
        results.clear()
        together = threading.Barrier(2)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while not (de.num_running() == 2 and all(len(t.out.token_ids) > 2 for t in _tracked(de))):
            if len(results) == 2:
                return None
            assert time.monotonic() < deadline, (
                f"the two streams never ran together: {de.num_running()} running, "
                f"{[len(t.out.token_ids) for t in _tracked(de)]} tokens, finished: {sorted(results)}"
            )
            time.sleep(0.005)
        return threads

    for _ in range(5):
        threads = overlapping()
        if threads is not None:
            break
    assert threads is not None, "in 5 tries the two streams never decoded at the same time"
    held = {t.worker.index for t in _tracked(de)}
    assert held == {0, 1}  # least-loaded routing put one stream on each decode worker
    _kill(next(w for w in de.workers if w.role == "decode" and w.index == 0).process.pid)
    for t in threads:
        t.join(timeout=60)
    errors = [r for r in results.values() if "decode worker 0" in r[0] and "died" in r[0]]
    finished = [r for r in results.values() if '"finish_reason": "' in r[0] and "error" not in r[0]]
    assert len(errors) == 1 and len(finished) == 1
    assert all(r[1] == "data: [DONE]" for r in results.values())
    # the server keeps serving on the surviving workers
    client = openai.OpenAI(base_url=server + "/v1", api_key="-", max_retries=0)
    assert (
        client.completions.create(model="dsv3-debug", prompt="Hi", max_tokens=5).usage.completion_tokens >= 1
    )
    # with no decode worker left, a request fails with a clear server error, not a hang
    _kill(next(w for w in de.workers if w.role == "decode" and w.index == 1).process.pid)
    r = httpx.post(
        server + "/v1/completions", json={"model": "dsv3-debug", "prompt": "Hi", "max_tokens": 5}, timeout=30
    )
    assert r.status_code == 500 and "decode worker" in r.json()["error"]["message"]


def test_speculative_decoding_across_workers(setup):
    """The prefill worker fills the MTP cache layer and the first draft; the decode worker verifies."""
    ref, state = setup
    model = ref.model
    with DisaggEngine(model, ref.tokenizer, max_batch_size=4, max_seq_len=MAX_SEQ, speculative=True) as de:
        got, _ = _run(de, PROMPTS, GREEDY)
    want, _ = _run(ref, PROMPTS, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(o.spec is not None and o.spec.drafted > 0 for o in got)


def test_cli_flags_and_bad_counts():
    args = build_parser().parse_args(
        ["serve", "--model", "x", "--disaggregate", "--prefill-workers", "2", "--decode-workers", "3"]
    )
    assert args.disaggregate and args.prefill_workers == 2 and args.decode_workers == 3
    cfg = ModelConfig.from_preset("debug")
    with pytest.raises(ValueError, match="decode_workers"):
        DisaggEngine(Transformer(cfg), decode_workers=0)
