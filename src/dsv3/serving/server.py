"""Build and run the server: load the model through `dsv3.LLM`, start the engine thread, run uvicorn.

Shutdown (SIGTERM/SIGINT, `DrainingServer`): stop accepting, let open requests run for up to
`graceful_timeout` seconds, then end each one still open with an error (streams: an error event and
`data: [DONE]`) and exit, about `graceful_timeout` after the signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path

import uvicorn

from dsv3.inference import LLM, EngineProtocol, TokenizerProtocol
from dsv3.inference.llm import parse_dtype
from dsv3.model import Transformer
from dsv3.serving.app import ServerState, create_app
from dsv3.serving.async_engine import AsyncEngine
from dsv3.tokenizer import Tokenizer


def _chat_template(model_dir: Path | None) -> str | None:
    """The directory's own chat template (chat_template.jinja, else tokenizer_config.json), or None."""
    if model_dir is None:
        return None
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return jinja_file.read_text(encoding="utf-8")
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        with contextlib.suppress(ValueError, OSError):
            t = json.loads(cfg.read_text()).get("chat_template")
            return t if isinstance(t, str) else None
    return None


def load_state(
    model: str | Path | Transformer | LLM,
    *,
    tokenizer: TokenizerProtocol | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    max_seq_len: int | None = None,
    speculative: bool = False,
    dtype: str | None = None,
    disaggregate: bool = False,
    prefill_workers: int = 1,
    decode_workers: int = 1,
    max_body_bytes: int = 4 << 20,
    protect_metrics: bool = False,
) -> ServerState:
    """model: a path (HF dir or run dir), a dsv3 Transformer, or a ready `dsv3.LLM`.

    disaggregate: prefill and decode in separate worker processes (dsv3.inference.disagg.DisaggEngine);
    max_batch_size is then per decode worker. max_body_bytes: larger request bodies get 413 unread.
    protect_metrics: /metrics needs the API key too."""
    if max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {max_queue}")
    if max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be >= 1, got {max_body_bytes}")
    if max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    model_dir = None
    if isinstance(model, str | Path):
        from dsv3.checkpoint import resolve_model_dir

        model_dir = Path(resolve_model_dir(model))
    engine: EngineProtocol
    if disaggregate:
        from dsv3.inference.disagg import DisaggEngine

        src = model.model if isinstance(model, LLM) else model
        tok = model.tokenizer if isinstance(model, LLM) and tokenizer is None else tokenizer
        disagg = DisaggEngine(
            model_dir or src,
            tok,
            prefill_workers=prefill_workers,
            decode_workers=decode_workers,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            dtype=parse_dtype(dtype),
            speculative=speculative,
        )
        engine, engine_tok = disagg, disagg.tokenizer
    else:
        llm = model
        if not isinstance(model, LLM):
            kw = dict(max_batch_size=max_batch_size, max_seq_len=max_seq_len, tokenizer=tokenizer)
            llm = LLM(model, dtype=dtype, **kw)
        llm.engine.speculative = speculative
        engine = llm.engine
        engine_tok = llm.tokenizer
    if model_name is None:
        model_name = Path(str(model)).name if isinstance(model, str | Path) else "dsv3"
    # chat: the directory's template, else the tokenizer's (DeepSeek-V3's unless its files name another)
    chat_tok = engine_tok if isinstance(engine_tok, Tokenizer) else None
    template = _chat_template(model_dir) or (chat_tok.chat_template if chat_tok is not None else None)
    state = ServerState(
        AsyncEngine(engine, max_queue=max_queue), model_name, api_key, template, chat_tok, engine_tok
    )
    state.max_body_bytes, state.protect_metrics = max_body_bytes, protect_metrics
    return state


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain in front of its shutdown: on SIGTERM it stops accepting, new
    requests on open connections get 503, open requests run until `graceful_timeout`, then each still
    open is ended with an error (a stream: an error event and `[DONE]`), and the process exits about
    then; uvicorn's own cut-off (a truncated body) only comes a second later, as a backstop."""

    def __init__(self, config: uvicorn.Config, state: ServerState, graceful_timeout: float):
        super().__init__(config)
        self.state, self.graceful_timeout = state, graceful_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.state.drain.start(self.graceful_timeout)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.state.drain.remaining(), self._end_open_requests)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _end_open_requests(self) -> None:
        n = self.state.engine.end_all(
            "The server is shutting down; this request was ended before it finished."
        )
        if n:
            print(f"dsv3 serve: graceful timeout reached, ended {n} open request(s)", flush=True)


def build_server(
    state: ServerState,
    host: str = "127.0.0.1",
    port: int = 8000,
    graceful_timeout: float = 30.0,
    log_level: str = "warning",
) -> uvicorn.Server:
    app = create_app(state)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state.engine.start()
        yield
        state.engine.shutdown(timeout=state.drain.remaining())
        state.core.close()  # the disaggregated engine's worker processes

    app.router.lifespan_context = lifespan
    if graceful_timeout < 0:
        raise ValueError(f"--graceful-timeout must be >= 0, got {graceful_timeout}")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
    config.timeout_graceful_shutdown = graceful_timeout + 1.0  # type: ignore[assignment]  # backstop only
    return DrainingServer(config, state, graceful_timeout)
