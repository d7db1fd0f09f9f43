"""Prefill and decode worker processes for disaggregated serving (the front end: dsv3.inference.disagg).

Each worker is a process (forked from a fork server that imported torch once, or spawned) with the model
(loaded from a path, or the front end's own weights shipped once through shared memory, so all workers
map the same pages) and an `Engine` over its own latent cache.

- A prefill worker batches new prompts and runs `Engine.step()`: the prompts' latent cache and their first
  token, sampled with each request's seeded generator, exactly as the colocated engine does. Every request
  that is not finished by its first token is then exported (`PrefillEngine.export`): its cache rows for all
  layers, the MTP layer included (c [S, kv_lora_rank] and pe [S, qk_rope_head_dim], packed as one
  [layers, S, C + R] tensor), the generator state, the draft logits (speculative mode) and the request's
  bookkeeping. Its slot is freed at once: a prefill worker holds no sequence longer than one step.
- A decode worker admits exported requests into free slots of its continuous batch (`DecodeEngine.
  admit_prefilled`: the rows are copied into the slot, nothing is recomputed) and decodes them with the
  others. Finished requests leave as in the colocated engine.

Transport (one machine, shared host memory): the cache tensor (copied to the CPU if the model is on a GPU)
is pickled with torch.multiprocessing's reducer, which moves it into a shared-memory segment and pickles
only a handle (a file descriptor the receiver
fetches from the sender's resource-sharer thread). These bytes travel prefill worker -> front end ->
decode worker, and only the decode worker maps the segment: the front end routes the handle without
touching the cache. Control messages go front end -> worker over a torch.multiprocessing Queue (its feeder
thread never blocks the front end) and worker -> front end over the worker's own Pipe, so a worker killed
mid-write can corrupt only its own channel. Every blocking wait in a worker has a timeout, and a worker
exits when its parent dies.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import queue
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing import parent_process
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory tensor reducers on ForkingPickler)

from dsv3.config import ModelConfig
from dsv3.inference.engine import Engine, _Request
from dsv3.inference.protocol import RequestOutput, StepOutput, TokenizerProtocol
from dsv3.inference.sampling import SamplingParams
from dsv3.inference.speculative import SpecStats
from dsv3.model import Transformer

IDLE_WAIT_S = 0.1  # how long an idle worker blocks on its inbox before checking that its parent lives


@dataclass
class WorkerSpec:
    """Everything a worker needs to build its model and engine (pickled once, at spawn)."""

    max_batch_size: int
    max_seq_len: int
    max_prefill_tokens: int
    speculative: bool
    threads: int
    tokenizer: TokenizerProtocol | None = None
    model_path: str | None = None  # load with dsv3.checkpoint.from_pretrained ...
    config: ModelConfig | None = None  # ... or rebuild from config + state dict (shared memory)
    state_dict: dict[str, torch.Tensor] | None = None
    dtype: torch.dtype | None = None

    def load_model(self) -> Transformer:
        if self.model_path is not None:
            from dsv3.checkpoint import from_pretrained

            torch.manual_seed(0)  # an MTP module absent from the checkpoint gets the same init everywhere
            return from_pretrained(self.model_path, dtype=self.dtype or torch.bfloat16).eval()
        if self.config is None or self.state_dict is None:
            raise ValueError("a worker needs a model path or a config and a state dict")
        from dsv3.inference.llm import cast_model

        # Built on the CPU, not on the meta device: the meta path imports torch's reference ops (seconds).
        # The random init is then replaced by the shipped tensors themselves (shared memory, no copy).
        model = Transformer(self.config)
        model.load_state_dict(self.state_dict, assign=True, strict=True)
        if self.dtype is not None and model.embed.weight.dtype != self.dtype:
            cast_model(model, self.dtype)
        return model.eval()


@dataclass
class Emitted:
    """One `StepOutput` as it crosses the process boundary (the text in full only when finished)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    text: str | None = None
    spec: SpecStats | None = None

    @classmethod
    def of(cls, o: StepOutput) -> Emitted:
        fin = o.finished
        return cls(
            o.request_id,
            o.new_token_ids,
            o.new_text,
            fin,
            o.finish_reason,
            o.output.text if fin else None,
            o.output.spec if fin else None,
        )


@dataclass
class Handoff:
    """A prefilled request on its way to a decode worker. `payload` is the pickled shared-memory handle of
    (kv [layers, S, C + R], draft_logits [1, V] | None); everything else is plain data."""

    request_id: str
    out: RequestOutput
    params: SamplingParams
    stop_ids: frozenset[int]
    emitted_text: int
    generator_state: bytes | None
    payload: bytes

    def load(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Map the shared cache (fails if the prefill worker died before handing the descriptor over)."""
        return pickle.loads(self.payload)


class PrefillEngine(Engine):
    """The colocated engine's prefill and first-token step, then `export` of each unfinished request."""

    def export(self, request_id: str) -> Handoff:
        """Copy a just-prefilled request out of the cache into shared memory and free its slot."""
        r = self.requests[request_id]
        s, n = r.slot, self.cache.lengths[r.slot]
        kv = self.cache.kv[:, s, :n].to("cpu", copy=True)  # [layers, S, C + R], its own storage
        draft = None if r.draft_logits is None else r.draft_logits.cpu().clone()
        payload = bytes(ForkingPickler.dumps((kv, draft)))
        gen = None if r.generator is None else r.generator.get_state().numpy().tobytes()
        h = Handoff(request_id, copy.deepcopy(r.out), r.params, r.stop_ids, r.emitted_text, gen, payload)
        del self.requests[request_id]
        self._release(r)
        return h


class DecodeEngine(Engine):
    """The colocated engine's decode loop, fed with requests prefilled elsewhere."""

    def admit_prefilled(self, h: Handoff, kv: torch.Tensor, draft_logits: torch.Tensor | None) -> None:
        """Put a prefilled request into the next free slot; the next `step()` decodes it."""
        rid, cache = h.request_id, self.cache
        if len(self.running) >= self.max_batch_size:
            raise ValueError(f"no free slot for request {rid!r}: all {self.max_batch_size} are running")
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        n = len(h.out.prompt_token_ids)
        expected = (cache.num_layers, n, cache.kv_lora_rank + cache.rope_dim)
        if tuple(kv.shape) != expected or n >= self.max_seq_len:
            raise ValueError(f"prefilled cache of shape {tuple(kv.shape)} does not fit (expected {expected})")
        if self.speculative and draft_logits is None:
            raise ValueError(f"request {rid!r} was prefilled without MTP draft logits")
        gen = None
        if h.generator_state is not None:
            gen = torch.Generator()
            gen.set_state(torch.frombuffer(bytearray(h.generator_state), dtype=torch.uint8))
        req = _Request(h.out, h.params, gen, h.stop_ids, emitted_text=h.emitted_text)
        req.draft_logits = draft_logits.to(cache.c.device) if self.speculative else None
        s = req.slot = len(self.running)
        cache.kv[:, s, :n] = kv
        cache.lengths[s] = n
        self.running.append(req)
        self.requests[rid] = req


# ------------------------------------------------------------------------------------------------ loops
def _inbox(inbox: Any, block: bool) -> list[tuple]:
    """Messages waiting in the inbox; when `block`, wait up to IDLE_WAIT_S for the first one."""
    msgs = []
    try:
        msgs.append(inbox.get(timeout=IDLE_WAIT_S) if block else inbox.get_nowait())
        while True:
            msgs.append(inbox.get_nowait())
    except queue.Empty:
        pass
    if block and not msgs:
        parent = parent_process()
        if parent is not None and not parent.is_alive():
            raise SystemExit(0)  # the front end is gone: nobody to serve
    return msgs


def _fail_all(engine: Engine, conn: Connection, err: BaseException) -> None:
    """A failed forward: every request of this worker fails; the worker itself keeps serving."""
    msg = f"{type(err).__name__}: {err}"
    for rid in list(engine.requests):
        engine.abort(rid)
        conn.send(("failed", rid, msg))


def prefill_loop(engine: PrefillEngine, inbox: Any, conn: Connection) -> None:
    while True:
        for msg in _inbox(inbox, block=not engine.has_unfinished()):
            if msg[0] == "stop":
                return
            if msg[0] == "add":
                _, rid, ids, params = msg
                try:
                    engine.add_request(rid, ids, params)
                except ValueError as e:
                    conn.send(("failed", rid, str(e)))
            elif msg[0] == "abort":
                engine.abort(msg[1])
        if not engine.has_unfinished():
            continue
        try:
            outs = engine.step()  # prefill + first token only: nothing stays in the batch between steps
        except Exception as e:  # noqa: BLE001
            _fail_all(engine, conn, e)
            continue
        handoffs, failed = [], []
        for o in outs:
            if not o.finished:
                try:
                    handoffs.append(engine.export(o.request_id))
                except Exception as e:  # noqa: BLE001  (e.g. out of shared memory)
                    engine.abort(o.request_id)
                    failed.append(("failed", o.request_id, f"exporting the prefilled cache failed: {e}"))
        conn.send(("prefilled", [Emitted.of(o) for o in outs], handoffs))
        for msg in failed:
            conn.send(msg)


def decode_loop(engine: DecodeEngine, inbox: Any, conn: Connection) -> None:
    pending: deque[tuple[Handoff, torch.Tensor, torch.Tensor | None]] = deque()
    while True:
        for msg in _inbox(inbox, block=not (engine.has_unfinished() or pending)):
            if msg[0] == "stop":
                return
            if msg[0] == "admit":
                h: Handoff = msg[1]
                try:
                    pending.append((h, *h.load()))  # map the cache now, while the prefill worker lives
                except Exception as e:  # noqa: BLE001
                    conn.send(("failed", h.request_id, f"the prefilled cache could not be received: {e}"))
            elif msg[0] == "abort":
                rid = msg[1]
                kept = [p for p in pending if p[0].request_id != rid]
                if len(kept) < len(pending):
                    pending = deque(kept)
                else:
                    engine.abort(rid)
        while pending and engine.num_running() < engine.max_batch_size:
            h, kv, draft = pending.popleft()
            try:
                engine.admit_prefilled(h, kv, draft)
            except ValueError as e:
                conn.send(("failed", h.request_id, str(e)))
        if not engine.has_unfinished():
            continue
        try:
            outs = engine.step()
        except Exception as e:  # noqa: BLE001
            _fail_all(engine, conn, e)
            continue
        conn.send(("decoded", [Emitted.of(o) for o in outs]))


def worker_main(role: str, spec: WorkerSpec, inbox: Any, conn: Connection) -> None:
    """Process entry point: build the model and engine, say ready, then serve until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front end's to handle (graceful shutdown)
    try:
        torch.set_num_threads(spec.threads)
        t0 = time.perf_counter()
        model = spec.load_model()
        cls = PrefillEngine if role == "prefill" else DecodeEngine
        engine = cls(
            model,
            spec.tokenizer,
            max_batch_size=spec.max_batch_size,
            max_seq_len=spec.max_seq_len,
            speculative=spec.speculative,
            max_prefill_tokens=spec.max_prefill_tokens,
        )
        conn.send(("ready", os.getpid(), time.perf_counter() - t0))
        (prefill_loop if role == "prefill" else decode_loop)(engine, inbox, conn)
    except (BrokenPipeError, EOFError, KeyboardInterrupt, SystemExit):
        pass  # the front end went away
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("fatal", traceback.format_exc(limit=8)))
        raise
    # Skip interpreter teardown (seconds with torch loaded): replies went out synchronously over the pipe
    # and nothing else is left to flush.
    os._exit(0)
