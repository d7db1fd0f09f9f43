"""Drive the inference engine from a background thread so the HTTP event loop never waits on compute.

The engine (a `dsv3.inference.EngineProtocol`: the colocated `Engine` or `DisaggEngine`) is
single-threaded: only this loop thread touches it. HTTP handlers submit and abort requests through a
command queue and receive `StepOutput`s on an asyncio.Queue per HTTP request (handed over with
`loop.call_soon_threadsafe`). Requests from all clients share the engine's continuous batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass

from dsv3.inference.protocol import EngineProtocol, StepOutput
from dsv3.inference.sampling import SamplingParams
from dsv3.serving.metrics import ServerMetrics


class QueueFullError(Exception):
    """More requests are waiting than --max-queue allows."""


@dataclass
class EngineError:
    """Sent on a request's queue when the engine refused or failed it."""

    request_id: str
    message: str
    finished: bool = True
    status: int | None = None  # HTTP status for a plain request (None: 500 for engine errors, else 400)
    code: str | None = None  # OpenAI error code


@dataclass
class _Sub:
    request_id: str
    index: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    last_token_time: float | None = None


class AsyncEngine:
    """Thread-owned engine with a bounded queue. `submit` from the event loop, `abort` from anywhere."""

    def __init__(self, engine: EngineProtocol, max_queue: int = 64, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self._commands: deque[tuple] = deque()
        self._subs: dict[str, _Sub] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="dsv3-engine", daemon=True)
        self.waiting = 0  # submitted, not yet running in the engine
        self.running = 0

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Let in-flight requests finish for up to `timeout` seconds, then abort the rest and stop."""
        deadline = time.monotonic() + timeout
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            for rid in list(self._subs):
                self._commands.append(("abort", rid))
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def capacity(self) -> int:
        """Requests held at once: the engine's batch plus the queue (--max-batch-size + --max-queue)."""
        return self.engine.max_batch_size + self.max_queue

    def end_all(self, message: str, status: int = 503, code: str = "shutting_down") -> int:
        """End every open request now (shutdown deadline): each gets an EngineError at once, the engine
        frees their slots on its thread. Returns how many were ended."""
        with self._lock:
            subs, self._subs = dict(self._subs), {}
            for rid in subs:
                self._commands.append(("abort", rid))
        for rid, sub in subs.items():
            self._send(sub, EngineError(rid, message, status=status, code=code))
        self._wake.set()
        return len(subs)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._subs)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        index: int,
        queue: asyncio.Queue,
        prefix: str = "req",
    ) -> str:
        """Queue one prompt; its StepOutputs (or an EngineError) arrive on `queue`. Raises QueueFullError."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if len(self._subs) >= self.capacity:
                raise QueueFullError
            rid = f"{prefix}-{next(self._ids)}"
            self._subs[rid] = _Sub(rid, index, loop, queue)
            self._commands.append(("add", rid, prompt_ids, params))
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self._subs:
                return
            self._commands.append(("abort", request_id))
        self._wake.set()

    def submit_all(
        self, items: list[tuple[list[int], SamplingParams]], queue: asyncio.Queue, prefix: str = "req"
    ) -> list[str]:
        """Queue the prompts of one request together (index = position): all, or QueueFullError."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if len(self._subs) + len(items) > self.capacity:
                raise QueueFullError
            rids = []
            for i, (prompt_ids, params) in enumerate(items):
                rid = f"{prefix}-{next(self._ids)}"
                self._subs[rid] = _Sub(rid, i, loop, queue)
                self._commands.append(("add", rid, prompt_ids, params))
                rids.append(rid)
        self._wake.set()
        return rids

    # ------------------------------------------------------------------ the loop thread
    def _send(self, sub: _Sub, item: StepOutput | EngineError) -> None:
        with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop is gone (shutdown)
            sub.loop.call_soon_threadsafe(sub.queue.put_nowait, (sub.index, item))

    def _drain_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                cmd = self._commands.popleft()
            if cmd[0] == "add":
                _, rid, ids, params = cmd
                try:
                    self.engine.add_request(rid, ids, params)
                except ValueError as e:
                    with self._lock:
                        sub = self._subs.pop(rid, None)
                    if sub is not None:
                        self._send(sub, EngineError(rid, str(e)))
            else:
                rid = cmd[1]
                self.engine.abort(rid)
                with self._lock:
                    sub = self._subs.pop(rid, None)
                if sub is not None:
                    self._send(sub, EngineError(rid, "request aborted"))

    def _loop(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            self._drain_commands()
            if not eng.has_unfinished():
                self.waiting = self.running = 0
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                outputs = eng.step()
            except Exception as e:  # a failed forward fails its requests; the server keeps serving
                with self._lock:
                    subs, self._subs = dict(self._subs), {}
                for rid, sub in subs.items():
                    eng.abort(rid)
                    self._send(sub, EngineError(rid, f"engine error: {type(e).__name__}: {e}"))
                self.metrics.inc("requests_failed", len(subs))
                continue
            now = time.perf_counter()
            self.running = eng.num_running()
            self.waiting = eng.num_waiting()
            for o in outputs:
                with self._lock:
                    sub = self._subs.get(o.request_id)
                    if sub is not None and o.finished:
                        del self._subs[o.request_id]
                if sub is None:
                    continue
                if o.finished and o.finish_reason == "error":  # one request failed (e.g. its worker died)
                    self.metrics.inc("requests_failed")
                    why = o.output.error or "the request failed"
                    self._send(sub, EngineError(o.request_id, f"engine error: {why}"))
                    continue
                n = len(o.new_token_ids)
                if o.finished and not o.output.token_ids and sub.last_token_time is None:  # scored only
                    self.metrics.inc("prompt_tokens", len(o.output.prompt_token_ids))
                if n:
                    if sub.last_token_time is None:
                        self.metrics.observe("ttft", now - o.output.arrival_time)
                        self.metrics.inc("prompt_tokens", len(o.output.prompt_token_ids))
                    else:
                        for _ in range(n):
                            self.metrics.observe("itl", (now - sub.last_token_time) / n)
                    sub.last_token_time = now
                    self.metrics.inc("completion_tokens", n)
                if o.finished and o.output.spec is not None:
                    self.metrics.inc("spec_drafted", o.output.spec.drafted)
                    self.metrics.inc("spec_accepted", o.output.spec.accepted)
                self._send(sub, o)
