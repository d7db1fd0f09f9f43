"""OpenAI-compatible HTTP API (FastAPI) over the engine's Python API.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics.
Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}} with a 4xx status; a full
queue answers 429 at once. A client that disconnects has its request aborted (cache slot freed).

Robustness (dsv3.serving.guard): bodies over `max_body_bytes` get 413 before they are read; request
fields are typed strictly (no "4" for 4, no "yes" for true); tokenization and chat rendering run in a
worker thread, never on the event loop, so /health answers while a large prompt is encoded; a request
with more prompts than the server can hold at once gets a 400 naming the limit. The API key is compared
in constant time; `/metrics` needs it too when `protect_metrics` is set. While the server drains
(SIGTERM), new requests get 503 and open ones are ended cleanly at the deadline.

Chat prompts use the model directory's chat template (tokenizer_config.json or chat_template.jinja, Jinja)
when it has one, else DeepSeek-V3's (dsv3.chat), rendered with the generation prompt
(`...<｜Assistant｜><think>\\n`) and tokenized with special-token parsing, as transformers does. Messages keep
their `tool_calls` / `tool_call_id`; a "developer" message counts as a system prompt.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv3.chat import DEEPSEEK_V3_CHAT_TEMPLATE, render
from dsv3.inference.protocol import EngineProtocol, RequestOutput, StepOutput, TokenizerProtocol
from dsv3.inference.sampling import SamplingParams
from dsv3.serving import logprobs as lp_layout
from dsv3.serving.async_engine import AsyncEngine, EngineError, QueueFullError
from dsv3.serving.choices import Plan, choice, fan_out
from dsv3.serving.guard import BodyLimit, Drain
from dsv3.serving.metrics import ServerMetrics
from dsv3.serving.schema import ChatMessage, ChatRequest, CompletionRequest, _Common
from dsv3.tokenizer import Tokenizer

__all__ = ["APIError", "ChatMessage", "ServerState", "create_app"]


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")  # message fields passed on to the chat template


def _message_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        texts.append(part["text"])
    return "".join(texts)


class ServerState:
    def __init__(
        self,
        async_engine: AsyncEngine,
        model_name: str,
        api_key: str | None,
        chat_template: str | None = None,
        chat_tokenizer: Tokenizer | None = None,
        tokenizer: TokenizerProtocol | None = None,
    ):
        """chat_template: None is DeepSeek-V3's. chat_tokenizer: encodes the rendered chat with its special
        tokens parsed (BOS from the template); without one the text goes through the engine's encode.
        tokenizer: the engine's (token strings in logprobs, echoed id prompts)."""
        self.engine = async_engine
        self.tokenizer = tokenizer
        self.tokens = lp_layout.TokenStrings(tokenizer)
        self.model_name = model_name
        self.api_key = api_key
        self.chat_template = chat_template if chat_template is not None else DEEPSEEK_V3_CHAT_TEMPLATE
        self.chat_tokenizer = chat_tokenizer
        self.created = int(time.time())
        self.max_body_bytes = 4 << 20  # requests with a larger body get 413 unread
        self.protect_metrics = False  # /metrics needs the API key too
        self.drain = Drain()

    def key_ok(self, header: str) -> bool:
        """`Authorization` header check, in constant time (no timing oracle on the key's prefix)."""
        if not self.api_key:
            return True
        return hmac.compare_digest(header.encode(), f"Bearer {self.api_key}".encode())

    @property
    def max_prompts(self) -> int:
        """Prompts one request may carry: what the engine's batch and the queue hold together."""
        return max(1, self.engine.capacity)

    @property
    def core(self) -> EngineProtocol:
        return self.engine.engine

    @property
    def metrics(self) -> ServerMetrics:
        return self.engine.metrics

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """Messages -> prompt token ids through the chat template, validated by the engine."""
        msgs = []
        for m in messages:
            extra = m.model_extra or {}
            msg = {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m.content)}
            msg.update({k: v for k, v in extra.items() if k in _TOOL_FIELDS and v is not None})
            msgs.append(msg)
        tok = self.chat_tokenizer
        try:
            if tok is None:  # the engine's encode puts BOS in front
                text = render(msgs, True, template=self.chat_template, bos_token="", eos_token="")
            else:
                text = render(msgs, True, tok, template=self.chat_template)
                ids, _ = tok.encode_with_offsets(text)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        return self.encode(text if tok is None else ids, "messages")

    def max_tokens(self, req: _Common, prompt_len: int, allow_zero: bool = False) -> int:
        """The request's completion budget, checked against the context (0 only when allow_zero: echo)."""
        max_seq = self.core.max_seq_len
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(256, max_seq - prompt_len))
        if max_tokens < (0 if allow_zero else 1):
            hint = "" if allow_zero else " (0 only with echo, to score the prompt)"
            raise APIError(400, f"max_tokens must be at least 1{hint}, got {max_tokens}", param="max_tokens")
        if prompt_len + max_tokens > max_seq:
            raise APIError(
                400,
                f"This model's maximum context length is {max_seq} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} for the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    def params(
        self,
        req: _Common,
        max_tokens: int,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                stop=stop,
                seed=req.seed,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                logit_bias=req.bias(),
            ).validate()
        except ValueError as e:
            msg = str(e)
            param = next(
                (f for f in ("logit_bias", "presence_penalty", "frequency_penalty") if f in msg), None
            )
            raise APIError(400, msg, param=param) from e

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        try:
            ids = self.core.encode(prompt)
        except ValueError as e:
            msg = str(e)
            code = "context_length_exceeded" if "max_seq_len" in msg else None
            raise APIError(400, msg, param=param, code=code) from e
        return ids


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="dsv3 OpenAI-compatible server")
    app.state.dsv3 = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg = "We could not parse the JSON body of your request."
        else:
            msg = "; ".join(
                f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body')}: {er.get('msg')}"
                for er in errs[:5]
            )
        return JSONResponse(error_body(msg, "invalid_request_error", ".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1") or (state.protect_metrics and path == "/metrics"):
            header = request.headers.get("authorization", "")
            if not state.key_ok(header):
                msg = "Missing API key." if not header else "Incorrect API key provided."
                return JSONResponse(
                    error_body(msg, "invalid_request_error", None, "invalid_api_key"), status_code=401
                )
            if state.drain.draining and request.method == "POST":
                body = error_body("The server is shutting down.", "server_error", None, "shutting_down")
                return JSONResponse(body, status_code=503)
        return await call_next(request)

    app.add_middleware(BodyLimit, max_bytes=state.max_body_bytes)  # outermost: before any parsing

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "dsv3"}
            ],
        }

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        core = state.core
        gauges = {
            "queue_depth": state.engine.waiting,
            "running_batch_size": state.engine.running,
            "requests_in_flight": state.engine.in_flight(),
            "kv_cache_bytes_per_token": core.kv_cache_bytes_per_token,
        }
        load = core.expert_load()
        text = state.metrics.render(gauges, None if load is None else load.tolist)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(state, req.model)
        prompts: list[str | list[int]]
        if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)):
            prompts = [req.prompt]
        else:
            prompts = list(req.prompt)
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(prompts) > state.max_prompts:
            raise APIError(
                400,
                f"{len(prompts)} prompts in one request; this server takes at most {state.max_prompts} "
                f"(--max-batch-size + --max-queue)",
                param="prompt",
            )
        max_seq = state.core.max_seq_len
        for p in prompts:  # a prompt given as ids is checked before anything is encoded
            if not isinstance(p, str) and len(p) >= max_seq:
                raise APIError(
                    400,
                    f"prompt has {len(p)} tokens; it must be shorter than max_seq_len={max_seq}",
                    param="prompt",
                    code="context_length_exceeded",
                )
        if (name := req.unsupported("completions")) is not None:
            raise APIError(400, _unsupported_msg(name), param=name, code="unsupported_parameter")
        n, best_of = req.n, req.best_of if req.best_of is not None else req.n
        if best_of < n:
            raise APIError(400, f"best_of ({best_of}) must be at least n ({n})", param="best_of")
        if req.stream and best_of > n:
            raise APIError(400, "best_of > n cannot be streamed", param="best_of")
        if len(prompts) * best_of > state.max_prompts:
            raise APIError(
                400,
                f"{len(prompts)} prompts x {best_of} samples in one request; this server takes at most "
                f"{state.max_prompts} (--max-batch-size + --max-queue)",
                param="n",
            )
        # tokenization is CPU work: off the event loop, so other requests (and /health) go on
        ids = await asyncio.to_thread(lambda: [state.encode(p, "prompt") for p in prompts])
        echo = bool(req.echo)
        items = []
        for i in ids:
            mt = state.max_tokens(req, len(i), allow_zero=echo)
            lp = req.logprobs if req.logprobs is not None else (0 if best_of > n else None)
            plp = (req.logprobs or 0) if echo and (req.logprobs is not None or mt == 0) else None
            items += [(i, p) for p in fan_out(state.params(req, mt, lp, plp), best_of)]
        tok = state.tokenizer
        bos = tok.bos_id if tok is not None else None
        plan = Plan(
            chat=False,
            n=n,
            best_of=best_of,
            prompt_lens=[len(i) for i in ids],
            logprobs=req.logprobs,
            echo=[
                (p if isinstance(p, str) else (tok.decode(i) if tok is not None else ""))
                for p, i in zip(prompts, ids)
            ]
            if echo
            else None,
            zero_width=[
                int(isinstance(p, str) and bos is not None and i[0] == bos) for p, i in zip(prompts, ids)
            ],
        )
        return await _run(state, request, req, items, plan)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        _check_model(state, req.model)
        if (name := req.unsupported("chat")) is not None:
            raise APIError(400, _unsupported_msg(name), param=name, code="unsupported_parameter")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if req.n > state.max_prompts:
            raise APIError(400, f"n={req.n}; this server takes at most {state.max_prompts}", param="n")
        ids = await asyncio.to_thread(state.chat_ids, req.messages)  # rendering + tokenizing: off the loop
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = state.params(req, state.max_tokens(req, len(ids)), logprobs=k)
        items = [(ids, p) for p in fan_out(params, req.n)]
        plan = Plan(chat=True, n=req.n, best_of=req.n, prompt_lens=[len(ids)], logprobs=k)
        return await _run(state, request, req, items, plan)

    return app


def _unsupported_msg(name: str) -> str:
    return f"`{name}` is not supported by this server (dsv3); remove it from the request"


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


async def _run(
    state: ServerState,
    request: Request,
    req: _Common,
    items: list[tuple[list[int], SamplingParams]],
    plan: Plan,
):
    queue: asyncio.Queue = asyncio.Queue()
    rids: list[str] = []
    state.metrics.inc("requests_total")
    try:  # all prompts of the request or none
        rids = state.engine.submit_all(items, queue)
    except QueueFullError:
        state.metrics.inc("requests_rejected")
        raise APIError(
            429,
            "The server is busy: too many requests are queued. Retry later.",
            type_="rate_limit_error",
            code="queue_full",
        ) from None
    cid = ("chatcmpl-" if plan.chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _stream(state, request, queue, rids, cid, created, plan, include_usage),
            media_type="text/event-stream",
        )
    outs: list[RequestOutput | None] = [None] * len(rids)
    done = 0
    try:
        while done < len(rids):
            idx, item = await _next(queue, request, rids, state)
            if isinstance(item, EngineError):
                status = item.status or (500 if item.message.startswith("engine error") else 400)
                kind = "server_error" if status >= 500 else "invalid_request_error"
                raise APIError(status, item.message, type_=kind, code=item.code)
            if item.finished:
                outs[idx] = item.output
                done += 1
    finally:
        for rid in rids:
            state.engine.abort(rid)
    choices = []
    for p in range(len(plan.prompt_lens)):
        group = outs[p * plan.best_of : (p + 1) * plan.best_of]
        if plan.best_of > plan.n:  # the n most likely samples (cumulative raw log-probability)
            group = sorted(group, key=lambda o: -(o.cumulative_logprob or 0.0))[: plan.n]
        for j, o in enumerate(group):
            choices.append(choice(state.tokens, plan, p, p * plan.n + j, o))
    # usage: each prompt once; every generated token, best_of's discarded samples included (they were run)
    pt = sum(plan.prompt_lens)
    ct = sum(len(o.token_ids) for o in outs)
    return {
        "id": cid,
        "object": "chat.completion" if plan.chat else "text_completion",
        "created": created,
        "model": state.model_name,
        "choices": choices,
        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
    }


async def _next(
    queue: asyncio.Queue, request: Request, rids: list[str], state: ServerState
) -> tuple[int, StepOutput | EngineError]:
    """The next engine output for this HTTP request; aborts everything if the client went away."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                for rid in rids:
                    state.engine.abort(rid)
                raise asyncio.CancelledError from None


async def _stream(
    state: ServerState,
    request: Request,
    queue: asyncio.Queue,
    rids: list[str],
    cid: str,
    created: int,
    plan: Plan,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per engine step and choice (index = the choice), with that step's
    tokens' logprobs when asked; an echoed prompt comes first in its choice's first chunk."""
    chat, ts = plan.chat, state.tokens
    offsets = [0] * len(rids)  # completions: characters of each choice's text sent so far
    started = [False] * len(rids)

    def chunk(
        idx: int, text: str | None, reason: str | None, logprobs: dict | None, first: bool = False
    ) -> str:
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": idx, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": idx, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
            obj = "text_completion"
        body = {"id": cid, "object": obj, "created": created, "model": state.model_name, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def step_logprobs(idx: int, o: StepOutput) -> dict | None:
        if plan.logprobs is None or not o.new_token_ids:
            return None
        lps, tops = o.new_logprobs or [], o.new_top_logprobs  # this step's, not the live output's
        if chat:
            return lp_layout.chat(ts, o.new_token_ids, lps, tops, plan.logprobs)
        return lp_layout.legacy(ts, o.new_token_ids, lps, tops, start=offsets[idx])

    done, completion_tokens = 0, 0
    try:
        if chat:
            for i in range(len(rids)):
                yield chunk(i, "", None, None, first=True)
        while done < len(rids):
            idx, item = await _next(queue, request, rids, state)
            if isinstance(item, EngineError):
                err = error_body(item.message, "server_error", None, item.code)
                yield f"data: {json.dumps(err)}\n\n"
                done += 1
                continue
            if not started[idx] and plan.echo is not None:
                p = idx // plan.n
                o = item.output
                pre = None
                if plan.logprobs is not None:
                    pre = lp_layout.legacy(
                        ts,
                        o.prompt_token_ids,
                        o.prompt_logprobs,
                        o.prompt_top_logprobs,
                        0,
                        plan.zero_width[p],
                    )
                offsets[idx] = len(plan.echo[p])
                yield chunk(idx, plan.echo[p], None, pre)
            started[idx] = True
            lps = step_logprobs(idx, item)
            if item.new_text or lps is not None:
                yield chunk(idx, item.new_text, None, lps)
                if lps is not None and not chat:  # the next chunk's text_offset starts after these tokens
                    offsets[idx] = lps["text_offset"][-1] + len(lps["tokens"][-1])
            if item.finished:
                completion_tokens += len(item.output.token_ids)
                yield chunk(idx, None if chat else "", item.finish_reason, None)
                done += 1
        if include_usage:
            pt = sum(plan.prompt_lens)
            usage = {
                "prompt_tokens": pt,
                "completion_tokens": completion_tokens,
                "total_tokens": pt + completion_tokens,
            }
            body = {
                "id": cid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": state.model_name,
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # normal end, client disconnect (the generator is cancelled) or error: free the cache slots
        for rid in rids:
            state.engine.abort(rid)
