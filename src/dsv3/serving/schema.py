"""The OpenAI request bodies the server takes, typed strictly (no "4" for 4, no "yes" for true).

Supported: /v1/completions `prompt, max_tokens, temperature, top_p, top_k, n, best_of, stop, seed, echo,
logprobs (0-20), logit_bias, presence_penalty, frequency_penalty, stream, stream_options, user`;
/v1/chat/completions the same sampling fields plus `messages, logprobs (bool), top_logprobs (0-20),
max_completion_tokens`. A field OpenAI's API defines but this server does not implement (`UNSUPPORTED`)
gets a 400 naming it unless it carries its no-op value (null, `tools: []`, `tool_choice: "none"`,
`response_format: {"type": "text"}`, `modalities: ["text"]`): silently ignoring it would hand the client
an answer to a different question. Other unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128  # samples per prompt (n, best_of)

# OpenAI API fields that change what the answer means, per endpoint; value -> True when it is a no-op
_NOOP = {
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "modalities": lambda v: v == ["text"],
}
UNSUPPORTED = {
    "completions": ("suffix",),
    "chat": (
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "parallel_tool_calls",
        "response_format",
        "audio",
        "modalities",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "verbosity",
    ),
}


class _Common(BaseModel):
    # unknown non-OpenAI fields are ignored, as OpenAI-compatible servers do; known ones are typed strictly
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None)
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)  # what torch.Generator takes
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias

    def unsupported(self, endpoint: str) -> str | None:
        """The first field of UNSUPPORTED[endpoint] this request sets to something other than a no-op."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED[endpoint]:
            v = extra.get(name)
            if v is not None and not (name in _NOOP and _NOOP[name](v)):
                return name
        return None

    def bias(self) -> dict[int, float]:
        """logit_bias with integer keys; ValueError naming a key that is not a token id."""
        out: dict[int, float] = {}
        for k, v in (self.logit_bias or {}).items():
            if not k.strip().isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
            out[int(k)] = v
        return out


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
