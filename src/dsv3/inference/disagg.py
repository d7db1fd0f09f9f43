"""Prefill/decode disaggregation: prefill workers and decode workers in separate processes, one front end.

DeepSeek-V3 is served with prefill and decode on separate units (REFERENCE.md): a long prompt's prefill
then never stalls the sequences that are decoding, and each side batches its own way. `DisaggEngine`
is that on one machine, behind the same interface as the colocated `Engine` (`EngineProtocol`,
dsv3.inference.protocol), so the OpenAI server wraps it unchanged (`dsv3 serve --disaggregate`). While
a request runs, its output's `text` is what has been streamed so far; the final text comes with the last.

A request's life: `add_request` validates and encodes it here, fixes its seed (a sampled request gets
one from the front end's generator, so its draws are reproducible wherever it runs) and sends it to the
prefill worker with the fewest prompt tokens queued. That worker computes the latent cache and the first
token (reported at once: time to first token does not wait for a decode slot) and hands the cache, the
generator state and the bookkeeping to the front end, which forwards the handle to the decode worker with
the fewest requests; the decode worker batches it with its other sequences and streams tokens back. The
workers and the transport (shared memory) are described in dsv3.inference.disagg_worker.

Failure: a worker that dies (or whose channel breaks) fails exactly the requests it holds, each with a
`StepOutput` whose finish_reason is "error" and whose `output.error` says which worker died; the other
workers keep serving, and new requests go to the live ones. No wait here blocks without a timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from dsv3.inference.cache import kv_cache_bytes_per_token
from dsv3.inference.disagg_worker import Emitted, Handoff, WorkerSpec, worker_main
from dsv3.inference.engine import Engine
from dsv3.inference.protocol import RequestOutput, StepOutput, TokenizerProtocol
from dsv3.inference.sampling import SamplingParams
from dsv3.model import Transformer

log = logging.getLogger(__name__)


@dataclass
class _Worker:
    role: str  # "prefill" | "decode"
    index: int
    process: Any
    inbox: Any  # torch.multiprocessing Queue, front end -> worker
    conn: Connection  # worker -> front end
    alive: bool = True
    requests: dict[str, int] = field(default_factory=dict)  # id -> load (prompt tokens | 1)
    fatal: str | None = None  # the traceback a crashing worker managed to send

    @property
    def name(self) -> str:
        return f"{self.role} worker {self.index} (pid {self.process.pid})"

    @property
    def load(self) -> int:
        return sum(self.requests.values())


@dataclass
class _Tracked:
    out: RequestOutput
    worker: _Worker


class DisaggEngine:
    """Front end over P prefill and D decode worker processes; see the module docstring.

    model: a Transformer (its weights are shared with the workers: torch moves them into shared memory in
    place) or an HF/run directory each worker loads itself. max_batch_size is per decode worker (the
    prefill workers batch as many prompts, within max_prefill_tokens); `self.max_batch_size` is the total.
    worker_threads: torch threads per worker (default: the CPU count over the number of workers).
    Use as a context manager or call `close()`: the workers are daemon processes either way."""

    def __init__(
        self,
        model: Transformer | str | Path,
        tokenizer: TokenizerProtocol | None = None,
        *,
        prefill_workers: int = 1,
        decode_workers: int = 1,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        speculative: bool = False,
        seed: int | None = None,
        max_prefill_tokens: int = 16384,
        worker_threads: int | None = None,
        start_timeout: float = 120.0,
        poll_timeout: float = 0.01,
        start_method: str | None = None,
    ):
        for name, v in (("prefill_workers", prefill_workers), ("decode_workers", decode_workers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        spec_kw: dict[str, Any]
        if isinstance(model, Transformer):
            config = model.config
            if speculative and len(model.mtp) == 0:
                raise ValueError("speculative decoding needs a model with an MTP module")
            dtype = dtype or model.embed.weight.dtype
            spec_kw = dict(config=config, state_dict=model.state_dict(), dtype=dtype)
        elif isinstance(model, str | Path):
            from dsv3.checkpoint.hf import read_hf_config, resolve_model_dir
            from dsv3.config import ModelConfig
            from dsv3.inference.llm import load_tokenizer

            model_dir = resolve_model_dir(model)
            config = ModelConfig.from_hf(read_hf_config(model_dir))
            dtype = dtype or torch.bfloat16
            spec_kw = dict(model_path=str(model_dir), dtype=dtype)
            if tokenizer is None:
                tokenizer = load_tokenizer(model_dir)
        else:
            raise ValueError(f"DisaggEngine expects a path or a dsv3 Transformer, got {type(model).__name__}")
        if max_seq_len is None:
            max_seq_len = min(config.max_position_embeddings, 4096)
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.add_bos = True
        self.speculative = bool(speculative)
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size * decode_workers  # decode slots over all workers
        self.kv_cache_bytes_per_token = kv_cache_bytes_per_token(config, dtype, include_mtp=True)
        self.poll_timeout = poll_timeout
        self.requests: dict[str, _Tracked] = {}
        self._errors: list[StepOutput] = []  # failures decided outside step(), reported by the next one
        seed = seed if seed is not None else int.from_bytes(os.urandom(8)) >> 1
        self._rng = torch.Generator().manual_seed(seed)
        self._rr = 0  # round-robin tie-break
        if worker_threads is None:
            worker_threads = max(1, (os.cpu_count() or 1) // (prefill_workers + decode_workers))
        spec = WorkerSpec(
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            max_prefill_tokens=max_prefill_tokens,
            speculative=self.speculative,
            threads=worker_threads,
            tokenizer=tokenizer,
            **spec_kw,
        )
        self.workers: list[_Worker] = []
        if start_method is None:  # a fork server imports torch once, then forks each worker from it
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        try:
            self._start(spec, prefill_workers, decode_workers, start_timeout, start_method)
        except BaseException:
            self.close(timeout=2.0)
            raise

    # ------------------------------------------------------------------ processes
    def _start(self, spec: WorkerSpec, n_prefill: int, n_decode: int, timeout: float, method: str) -> None:
        ctx = mp.get_context(method)
        if method == "forkserver":  # takes effect if this process has not started its fork server yet
            ctx.set_forkserver_preload(["dsv3.inference.disagg_worker"])
        roles = ["prefill"] * n_prefill + ["decode"] * n_decode
        for i, role in enumerate(roles):
            index = i if role == "prefill" else i - n_prefill
            recv, send = ctx.Pipe(duplex=False)
            inbox = ctx.Queue()
            proc = ctx.Process(
                target=worker_main, args=(role, spec, inbox, send), name=f"dsv3-{role}-{index}", daemon=True
            )
            try:
                proc.start()  # pickles the spec: the tokenizer must be picklable
            except (pickle.PicklingError, AttributeError, TypeError) as e:
                raise ValueError(f"cannot send the model/tokenizer to a worker process: {e}") from e
            send.close()  # the worker holds the only write end: its death reads as EOF here
            self.workers.append(_Worker(role, index, proc, inbox, recv))
        deadline = time.monotonic() + timeout
        starting = {w.conn: w for w in self.workers}
        while starting:
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(w.name for w in starting.values())
                raise RuntimeError(f"disaggregated workers did not start within {timeout:.0f} s: {names}")
            for conn in wait(list(starting), timeout=left):
                w = starting.pop(conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = ("fatal", f"exit code {w.process.exitcode}")
                if msg[0] != "ready":
                    raise RuntimeError(f"{w.name} failed to start:\n{msg[1]}")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (their in-flight requests fail), waiting up to `timeout` seconds in all."""
        for w in self.workers:
            if w.alive:
                with contextlib.suppress(OSError, ValueError):
                    w.inbox.put(("stop",))
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in self.workers:
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=2.0)
            if w.alive:
                self._retire(w, "the engine was closed")

    def __enter__(self) -> DisaggEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retire(self, w: _Worker, reason: str) -> None:
        """Mark a worker dead, close its channels and fail the requests it held."""
        w.alive = False
        if w.process.is_alive():
            w.process.kill()
        w.inbox.cancel_join_thread()
        w.inbox.close()
        w.conn.close()
        detail = f"{w.name} {reason}"
        if w.fatal:
            detail += f": {w.fatal.strip().splitlines()[-1]}"
        if w.requests:
            log.error("%s; failing its %d request(s)", detail, len(w.requests))
        for rid in list(w.requests):
            self._fail(rid, f"{detail}; the request was lost")

    def _check_workers(self) -> None:
        for w in self.workers:
            if w.alive and not w.process.is_alive():
                self._retire(w, f"died (exit code {w.process.exitcode})")

    # ------------------------------------------------------------------ the engine interface
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """As `Engine.encode` (which reads only tokenizer, add_bos, config and max_seq_len)."""
        return Engine.encode(self, prompt)  # type: ignore[arg-type]

    @property
    def waiting(self) -> list[str]:
        """Requests not yet decoding (queued at or running in a prefill worker)."""
        return [rid for rid, t in self.requests.items() if t.worker.role == "prefill"]

    def num_running(self) -> int:
        return sum(1 for t in self.requests.values() if t.worker.role == "decode")

    def num_waiting(self) -> int:
        return len(self.waiting)

    def expert_load(self) -> torch.Tensor | None:
        """None: the workers do not report expert load."""
        return None

    def has_unfinished(self) -> bool:
        return bool(self.requests or self._errors)

    def location(self, request_id: str) -> tuple[str, int] | None:
        """(role, worker index) of the worker now holding the request, or None."""
        t = self.requests.get(request_id)
        return None if t is None else (t.worker.role, t.worker.index)

    def add_request(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> RequestOutput:
        """Queue a request at a prefill worker. Raises ValueError (and changes nothing) on bad input."""
        params = (params or SamplingParams()).validate()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.extra_fields():  # the workers return tokens only
            raise ValueError(f"{', '.join(params.extra_fields())}: not supported by the disaggregated engine")
        ids = self.encode(prompt)
        if not params.greedy and params.seed is None:
            params = dataclasses.replace(params, seed=int(torch.randint(2**62, (1,), generator=self._rng)))
        out = RequestOutput(
            request_id, prompt if isinstance(prompt, str) else None, ids, arrival_time=time.perf_counter()
        )
        w = self._pick("prefill")
        if w is None:
            self._errors.append(self._failed_output(out, "no live prefill worker"))
            return out
        self.requests[request_id] = _Tracked(out, w)
        w.requests[request_id] = len(ids)
        w.inbox.put(("add", request_id, ids, params))
        return out

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request wherever it is; its worker frees the slot when the message arrives."""
        t = self.requests.pop(request_id, None)
        if t is None:
            return None
        t.worker.requests.pop(request_id, None)
        if t.worker.alive:
            t.worker.inbox.put(("abort", request_id))
        out = t.out
        if not out.finished:
            out.finished, out.finish_reason, out.finish_time = True, "abort", time.perf_counter()
        return out

    def step(self) -> list[StepOutput]:
        """Collect what the workers produced (waiting up to poll_timeout for the first message)."""
        outputs, self._errors = self._errors, []
        live = {w.conn: w for w in self.workers if w.alive}
        if self.requests and live:
            for conn in wait(list(live), timeout=0 if outputs else self.poll_timeout):
                w = live[conn]
                while w.alive:
                    try:
                        if not conn.poll():
                            break
                        msg = conn.recv()
                    except (EOFError, OSError, pickle.UnpicklingError) as e:
                        w.process.join(timeout=1.0)  # EOF: it is exiting; else its channel is corrupt
                        code = w.process.exitcode
                        why = f"broke its channel ({type(e).__name__})" if code is None else ""
                        self._retire(w, why or f"died (exit code {code})")
                        break
                    self._handle(w, msg, outputs)
        self._check_workers()  # after reading: a worker's last messages count before its death
        outputs.extend(self._errors)
        self._errors = []
        return outputs

    # ------------------------------------------------------------------ messages
    def _handle(self, w: _Worker, msg: tuple, outputs: list[StepOutput]) -> None:
        kind = msg[0]
        if kind in ("prefilled", "decoded"):
            for e in msg[1]:
                self._apply(e, outputs)
            for h in msg[2] if kind == "prefilled" else ():
                self._hand_off(h)
        elif kind == "failed":
            self._fail(msg[1], f"{w.name}: {msg[2]}")
        elif kind == "fatal":
            w.fatal = msg[1]
        else:
            log.warning("unexpected message %r from %s", kind, w.name)

    def _apply(self, e: Emitted, outputs: list[StepOutput]) -> None:
        t = self.requests.get(e.request_id)
        if t is None:
            return  # aborted meanwhile
        out = t.out
        if e.new_token_ids and out.first_token_time is None:
            out.first_token_time = time.perf_counter()
        out.token_ids.extend(e.new_token_ids)
        out.text += e.new_text
        if e.finished:
            out.text = e.text if e.text is not None else out.text
            out.finished, out.finish_reason, out.finish_time = True, e.finish_reason, time.perf_counter()
            out.spec = e.spec
            del self.requests[e.request_id]
            t.worker.requests.pop(e.request_id, None)
        new_ids, reason = e.new_token_ids, e.finish_reason
        outputs.append(StepOutput(e.request_id, new_ids, e.new_text, e.finished, reason, out))

    def _hand_off(self, h: Handoff) -> None:
        """Forward a prefilled request's cache handle to the least-loaded live decode worker."""
        t = self.requests.get(h.request_id)
        if t is None:
            with contextlib.suppress(Exception):  # aborted meanwhile: map and drop the cache (its descriptor)
                h.load()
            return
        d = self._pick("decode")
        if d is None:
            self._fail(h.request_id, "no live decode worker")
            return
        t.worker.requests.pop(h.request_id, None)
        t.worker = d
        d.requests[h.request_id] = 1
        d.inbox.put(("admit", h))

    def _pick(self, role: str) -> _Worker | None:
        live = [w for w in self.workers if w.alive and w.role == role]
        if not live:
            return None
        self._rr += 1
        k = self._rr % len(live)
        return min(live[k:] + live[:k], key=lambda w: w.load)  # least loaded; ties rotate

    def _failed_output(self, out: RequestOutput, message: str) -> StepOutput:
        out.finished, out.finish_reason, out.error = True, "error", message
        out.finish_time = time.perf_counter()
        return StepOutput(out.request_id, [], "", True, "error", out)

    def _fail(self, request_id: str, message: str) -> None:
        t = self.requests.pop(request_id, None)
        if t is None:
            return
        t.worker.requests.pop(request_id, None)
        self._errors.append(self._failed_output(t.out, message))
