"""The engine: requests in, tokens out, with continuous batching over a static latent cache.

`Engine.add_request(id, prompt, params)` queues a request (bad input raises ValueError and changes
nothing); each `step()` (1) admits waiting requests into free cache slots and prefills them together,
sampling their first token, then (2) decodes one token (or verifies a draft: speculative mode) for every
request that was already running, and (3) releases finished requests, moving the last running slot into
the hole so running requests always occupy slots 0..n-1. Nothing already in the cache is recomputed.
`step()` returns one `StepOutput` per request that produced tokens; `abort(id)` frees a slot at once.

Log-probabilities come from the same forwards: a generated token's from the logits it was sampled from
(raw, or processed: SamplingParams.logprobs_mode); a prompt's (`prompt_logprobs`) from the head applied to
the prefill's hidden states of that request only (the batch's prefill otherwise runs the head at the last
position alone), in chunks of PROMPT_LOGPROBS_CHUNK positions. A request with max_new_tokens=0 (scoring)
finishes right after its prefill, finish_reason "length". Speculative mode supports none of these
(nor logit_bias and penalties): add_request raises ValueError naming the field.

State lives in the Engine instance only (no globals); thread safety is the caller's (the server's) job.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dsv3.inference.cache import LatentKVCache
from dsv3.inference.generate import ModelRunner
from dsv3.inference.protocol import RequestOutput, StepOutput, TokenizerProtocol
from dsv3.inference.sampling import SamplingParams, adjust_logits, log_softmax_rows, sample, top_logprobs
from dsv3.inference.speculative import SpecStats, speculative_step
from dsv3.model import Transformer

PROMPT_LOGPROBS_CHUNK = 512  # prompt positions whose [chunk, V] logits are materialised at once


@dataclass
class _Request:
    out: RequestOutput
    params: SamplingParams
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    slot: int = -1
    draft_logits: torch.Tensor | None = None  # [k, V] (speculative mode)
    emitted_text: int = 0  # characters of out.text already streamed
    new_tokens: list[int] = field(default_factory=list)  # produced in the current step

    @property
    def pending(self) -> int:
        return self.out.token_ids[-1]


class Engine:
    """Continuous-batching generation over one model. See the module docstring for the step cycle."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: TokenizerProtocol | None = None,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        speculative: bool = False,
        seed: int | None = None,
        max_prefill_tokens: int = 16384,
    ):
        cfg = model.config
        if max_seq_len is None:
            max_seq_len = min(cfg.max_position_embeddings, 4096)
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self.model = model.eval()
        self.config = cfg
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.add_bos = True
        # streaming callers read each step's text delta; LLM.generate turns this off and reads the final
        # text only (detokenising every running request at every step is ~10% of a small model's decode)
        self.stream_text = True
        w = model.embed.weight
        self.cache = LatentKVCache(cfg, max_batch_size, max_seq_len, dtype=w.dtype, device=w.device)
        self.runner = ModelRunner(model, self.cache)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []  # index == cache slot
        self.requests: dict[str, _Request] = {}
        self.spec_stats = SpecStats(per_position=[0])
        self._speculative = False
        self.speculative = speculative
        self._rng = torch.Generator().manual_seed(
            seed if seed is not None else int.from_bytes(os.urandom(8)) >> 1
        )
        tok_eos = tokenizer.eos_id if tokenizer is not None else None
        self.eos_ids = frozenset(i for i in (cfg.eos_token_id, tok_eos) if isinstance(i, int) and i >= 0)

    # ------------------------------------------------------------------ configuration
    @property
    def speculative(self) -> bool:
        return self._speculative

    @speculative.setter
    def speculative(self, on: bool) -> None:
        on = bool(on)
        if on == self._speculative:
            return
        if on and not self.runner.has_mtp:
            raise ValueError(
                "speculative decoding needs a model with an MTP module (num_nextn_predict_layers >= 1)"
            )
        if self.has_unfinished():
            raise ValueError("cannot switch speculative decoding on or off while requests are in flight")
        self._speculative = on

    @property
    def kv_cache_bytes_per_token(self) -> int:
        return self.cache.bytes_per_token

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt (text or token ids) -> validated token ids. Text gets the tokenizer's BOS in front."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or load one")
            if not prompt:
                raise ValueError("empty prompt")
            ids = list(self.tokenizer.encode(prompt))
            bos = self.tokenizer.bos_id
            if bos is not None and self.add_bos:  # documents start with BOS in training
                ids = [bos, *ids]
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("empty prompt")
        V = self.config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                raise ValueError(f"prompt token {t!r} is not an integer in [0, vocab_size={V})")
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, longer than the engine allows: it must be shorter than "
                f"max_seq_len={self.max_seq_len} to leave room for generation"
            )
        return ids

    def add_request(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> RequestOutput:
        """Queue a request. Raises ValueError (and changes nothing) on bad input."""
        params = (params or SamplingParams()).validate()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self._speculative and params.extra_fields():
            raise ValueError(f"{', '.join(params.extra_fields())}: not supported in speculative mode")
        V = self.config.vocab_size
        for k in params.logit_bias:
            if k >= V:
                raise ValueError(f"logit_bias token id {k} is not in [0, vocab_size={V})")
        ids = self.encode(prompt)
        gen = None
        if not params.greedy:
            seed = (
                params.seed
                if params.seed is not None
                else int(torch.randint(2**62, (1,), generator=self._rng))
            )
            gen = torch.Generator().manual_seed(seed)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        out = RequestOutput(
            request_id, prompt if isinstance(prompt, str) else None, ids, arrival_time=time.perf_counter()
        )
        if self._speculative:
            out.spec = SpecStats(per_position=[0])
        if params.logprobs is not None:
            out.logprobs, out.cumulative_logprob = [], 0.0
            if params.logprobs > 0:
                out.top_logprobs = []
        req = _Request(out, params, gen, stop_ids)
        self.requests[request_id] = req
        self.waiting.append(req)
        return out

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request (waiting or running), freeing its cache slot. Unknown ids return None."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.slot >= 0:
            self._release(req)
        else:
            self.waiting.remove(req)
        if not req.out.finished:
            req.out.finished, req.out.finish_reason = True, "abort"
            req.out.finish_time = time.perf_counter()
        return req.out

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_running(self) -> int:
        return len(self.running)

    def num_waiting(self) -> int:
        return len(self.waiting)

    def expert_load(self) -> torch.Tensor | None:
        """None: this engine does not record expert load (EPEngine does, with an ExpertLoadRecorder)."""
        return None

    def close(self) -> None:
        """Nothing to release: the engine owns no processes (EngineProtocol)."""

    # ------------------------------------------------------------------ the step
    def step(self) -> list[StepOutput]:
        """Admit + prefill new requests, decode the running ones, release finished ones."""
        n_old = len(self.running)
        touched = list(self.running)
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
            touched += admitted
        if n_old:
            if self._speculative:
                self._decode_speculative(n_old)
            else:
                self._decode(n_old)
        outputs = [self._emit(r) for r in touched if r.new_tokens or r.out.finished]
        for r in sorted((r for r in touched if r.out.finished), key=lambda r: -r.slot):
            self._release(r)
            self.requests.pop(r.out.request_id, None)
        return outputs

    def _admit(self) -> list[_Request]:
        free = self.max_batch_size - len(self.running)
        admitted: list[_Request] = []
        longest = 0
        while self.waiting and len(admitted) < free:
            n = len(self.waiting[0].out.prompt_token_ids)
            if admitted and (len(admitted) + 1) * max(longest, n) > self.max_prefill_tokens:
                break
            longest = max(longest, n)
            admitted.append(self.waiting.popleft())
        for r in admitted:
            r.slot = len(self.running)
            self.running.append(r)
        return admitted

    def _prefill(self, reqs: list[_Request]) -> None:
        slot = reqs[0].slot
        pre = self.runner.prefill(slot, [r.out.prompt_token_ids for r in reqs])
        params = [r.params for r in reqs]
        adjusted = adjust_logits(pre.logits, params, [[] for _ in reqs])
        first = sample(adjusted, params, [r.generator for r in reqs])
        self._record_logprobs(reqs, pre.logits, adjusted, first)
        self._record_prompt_logprobs(reqs, pre.hidden)
        if self._speculative:
            drafts = self.runner.mtp_prefill(slot, pre, first)
        now = time.perf_counter()
        for b, (r, t) in enumerate(zip(reqs, first.tolist())):
            r.out.first_token_time = now
            if r.params.max_new_tokens == 0:  # scoring only: nothing is generated
                self._finish(r, "length", [])
                continue
            if self._speculative:
                r.draft_logits = drafts[b]
                r.out.spec.forwards += 1
                r.out.spec.tokens += 1
                self.spec_stats.forwards += 1
                self.spec_stats.tokens += 1
            self._commit(r, t)

    def _decode(self, n: int) -> None:
        reqs = self.running[:n]
        tokens = torch.tensor([[r.pending] for r in reqs])
        starts = torch.tensor(self.cache.lengths[:n])
        logits, _ = self.runner.decode(tokens, starts)
        raw, params = logits[:, -1], [r.params for r in reqs]
        adjusted = adjust_logits(raw, params, [r.out.token_ids for r in reqs])
        nxt_t = sample(adjusted, params, [r.generator for r in reqs])
        self._record_logprobs(reqs, raw, adjusted, nxt_t)
        nxt = nxt_t.tolist()
        for i, (r, t) in enumerate(zip(reqs, nxt)):
            self.cache.lengths[i] += 1
            self._commit(r, t)

    def _decode_speculative(self, n: int) -> None:
        reqs = self.running[:n]
        starts = torch.tensor(self.cache.lengths[:n])
        pending = torch.tensor([r.pending for r in reqs])
        draft_logits = torch.stack([r.draft_logits for r in reqs])
        hidden: list[torch.Tensor] = []

        def target(tokens: torch.Tensor) -> torch.Tensor:
            logits, h = self.runner.decode(tokens, starts)
            hidden.append(h)
            return logits

        def draft(tokens: torch.Tensor, n_commit: torch.Tensor) -> torch.Tensor:
            return self.runner.mtp_decode(hidden[0], tokens, starts, n_commit - 1).unsqueeze(1)

        step = speculative_step(
            target, draft, pending, draft_logits, [r.params for r in reqs], [r.generator for r in reqs]
        )
        toks = step.tokens.tolist()
        for i, (r, c, a) in enumerate(zip(reqs, step.num_committed.tolist(), step.num_accepted.tolist())):
            self.cache.lengths[i] += c
            r.draft_logits = step.draft_logits[i]
            k = step.tokens.shape[1] - 1
            st = SpecStats(drafted=k, accepted=a, forwards=1, per_position=[int(a > j) for j in range(k)])
            for t in toks[i][:c]:
                st.tokens += 1
                if self._commit(r, t):
                    break
            r.out.spec.add(st)
            self.spec_stats.add(st)

    # ------------------------------------------------------------------ bookkeeping
    def _record_logprobs(
        self, reqs: list[_Request], raw: torch.Tensor, adjusted: torch.Tensor, tokens: torch.Tensor
    ) -> None:
        """Append each sampled token's log-probability (and top alternatives) for the requests that asked
        for them. raw: the model's logits [n, V]; adjusted: after logit_bias and penalties."""
        rows = [i for i, r in enumerate(reqs) if r.out.logprobs is not None and r.params.max_new_tokens > 0]
        if not rows:
            return
        idx = torch.tensor(rows, device=raw.device)
        sub = [reqs[i].params for i in rows]
        logp = log_softmax_rows(raw[idx], adjusted[idx], sub)
        chosen, tops = top_logprobs(logp, tokens[idx.to(tokens.device)], [p.logprobs or 0 for p in sub])
        for i, c, t in zip(rows, chosen, tops):
            out = reqs[i].out
            out.logprobs.append(c)
            out.cumulative_logprob += c
            if out.top_logprobs is not None:
                out.top_logprobs.append(t)

    def _record_prompt_logprobs(self, reqs: list[_Request], hidden: torch.Tensor) -> None:
        """Raw log-probabilities of the prompt tokens of the requests that asked (hidden [n, P, D] from
        the prefill): position i scores token i + 1; the first token has none."""
        for b, r in enumerate(reqs):
            k = r.params.prompt_logprobs
            if k is None:
                continue
            ids = r.out.prompt_token_ids
            targets = torch.tensor(ids[1:], dtype=torch.long)
            lps: list[float | None] = [None]
            tops: list[dict[int, float] | None] = [None]
            for s in range(0, len(ids) - 1, PROMPT_LOGPROBS_CHUNK):
                e = min(len(ids) - 1, s + PROMPT_LOGPROBS_CHUNK)
                logp = torch.log_softmax(self.runner.head(hidden[b, s:e]), dim=-1)
                chosen, top = top_logprobs(logp, targets[s:e], [k] * (e - s))
                lps += chosen
                tops += top
            r.out.prompt_logprobs = lps
            r.out.prompt_top_logprobs = tops if k > 0 else None

    def _finish(self, r: _Request, reason: str, text_ids: list[int] | None) -> None:
        out = r.out
        out.finished, out.finish_reason = True, reason
        out.finish_time = time.perf_counter()
        if self.tokenizer is not None and text_ids is not None:
            out.text = self._detok(text_ids)

    def _commit(self, r: _Request, token: int) -> bool:
        """Append one token and apply the stop rules; True when the request is finished."""
        out, p = r.out, r.params
        out.token_ids.append(token)
        r.new_tokens.append(token)
        reason = None
        text_ids = out.token_ids
        if token in r.stop_ids:
            reason, text_ids = "stop", out.token_ids[:-1]  # the stop token is not part of the text
        elif p.stop and self.tokenizer is not None:
            text = self._detok(out.token_ids)
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                reason, out.text = "stop", text[: min(hits)]
                text_ids = None  # text already final
        if reason is None and len(out.token_ids) >= p.max_new_tokens:
            reason = "length"
        if reason is None and len(out.prompt_token_ids) + len(out.token_ids) >= self.max_seq_len:
            reason = "length"
        if reason is not None:
            self._finish(r, reason, text_ids)
        return reason is not None

    def _detok(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _emit(self, r: _Request) -> StepOutput:
        out = r.out
        delta = ""
        if self.stream_text or out.finished:  # batch generation (stream_text off): the text once, at the end
            if self.tokenizer is not None and not out.finished:
                out.text = self._detok(out.token_ids)
            text = out.text
            end = len(text)
            if not out.finished:
                end -= len(text) - len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence: wait
                if r.params.stop:  # hold back what could be the start of a stop string
                    end = min(end, max(r.emitted_text, len(text) - max(len(s) for s in r.params.stop) + 1))
            delta = text[r.emitted_text : end] if end > r.emitted_text else ""
            r.emitted_text = max(r.emitted_text, end)
        new, r.new_tokens = r.new_tokens, []
        k = len(new)
        new_lp = out.logprobs[len(out.logprobs) - k :] if out.logprobs is not None else None
        new_top = out.top_logprobs[len(out.top_logprobs) - k :] if out.top_logprobs is not None else None
        return StepOutput(out.request_id, new, delta, out.finished, out.finish_reason, out, new_lp, new_top)

    def _release(self, r: _Request) -> None:
        s, last = r.slot, len(self.running) - 1
        if s != last:
            moved = self.running[last]
            self.cache.move(last, s)
            self.running[s] = moved
            moved.slot = s
        else:
            self.cache.lengths[s] = 0
        self.running.pop()
        r.slot = -1
