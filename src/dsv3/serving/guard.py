"""What keeps one client from hurting the others: a request-body limit enforced before parsing, and the
shutdown drain that ends open requests cleanly.

- `BodyLimit` (ASGI middleware): a body whose Content-Length exceeds the limit gets 413 before a byte of
  it is read; a body without a length (chunked) is counted as it arrives and cut off at the limit. The
  oversized body is never held whole, so it costs the server neither memory nor event-loop time.
- `Drain`: SIGTERM starts it; new requests then get 503, open ones may finish until the deadline, and
  at the deadline every request still open is ended by the engine side with an error (a stream gets an
  error event and `data: [DONE]`, a plain request a 503), so no client sees a truncated body.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _error_json(message: str, type_: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


async def send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: 413 for request bodies over `max_bytes` (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"--max-body-bytes must be >= 1, got {max_bytes}")
        self.app, self.max_bytes = app, max_bytes

    def _message(self, size: int | None) -> str:
        got = f"{size} bytes" if size is not None else "more than that"
        return f"Request body too large: {got}, the limit is {self.max_bytes} bytes (--max-body-bytes)."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                await send_json(
                    send, 400, _error_json("invalid Content-Length", "invalid_request_error", "bad")
                )
                return
            if size > self.max_bytes:
                body = _error_json(self._message(size), "invalid_request_error", "request_too_large")
                await send_json(send, 413, body)
                return
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            receive = await self._read_bounded(receive, send)
            if receive is None:
                return
        await self.app(scope, receive, send)

    async def _read_bounded(self, receive: Receive, send: Send) -> Receive | None:
        """A body without a length (chunked): read it here, at most max_bytes of it (413 past that),
        and hand it on whole."""
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left
                chunks = []
                break
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                body = _error_json(self._message(None), "invalid_request_error", "request_too_large")
                await send_json(send, 413, body)
                return None
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        return replayed


class Drain:
    """Shutdown state shared by the HTTP handlers and the server (see the module docstring)."""

    def __init__(self) -> None:
        self.deadline: float | None = None  # time.monotonic() when open requests are ended

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def start(self, timeout_s: float) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + max(0.0, timeout_s)

    def remaining(self) -> float:
        return 0.0 if self.deadline is None else max(0.0, self.deadline - time.monotonic())
