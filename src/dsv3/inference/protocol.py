"""The interfaces the inference layer offers: `EngineProtocol` (what the server drives) and
`TokenizerProtocol` (what an engine needs from a tokenizer), and the outputs an engine returns
(`RequestOutput`, `StepOutput`).

Two engines implement `EngineProtocol`: the colocated `Engine` (one process, continuous batching) and
`DisaggEngine` (prefill and decode in worker processes). The OpenAI server (dsv3.serving) types against
the protocol only, so everything it reads is declared here: what an engine may lack is an explicit
`None` (`expert_load()`), never an attribute probed with getattr, and an engine with nothing to release
still has `close()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from dsv3.inference.sampling import SamplingParams
from dsv3.inference.speculative import SpecStats


@dataclass
class RequestOutput:
    """A request's result so far (final once `finished`). Times are seconds (time.perf_counter)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    spec: SpecStats | None = None  # speculative statistics (speculative mode only)
    error: str | None = None  # why the request failed (finish_reason "error": e.g. its worker died)
    # SamplingParams.logprobs (mode as requested): per generated token, its log-probability; with logprobs
    # > 0 also its top alternatives (the chosen token included, most likely first); their running sum
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    # SamplingParams.prompt_logprobs (raw, one prefill): per prompt token, None for the first one
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def total_time(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def acceptance_rate(self) -> float | None:
        return None if self.spec is None else self.spec.acceptance

    @property
    def tokens_per_forward(self) -> float | None:
        return None if self.spec is None else self.spec.tokens_per_forward


@dataclass
class StepOutput:
    """What one step produced for one request: new tokens and text, and the request's output so far."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    output: RequestOutput
    # the new tokens' log-probabilities and top alternatives, copied at this step (`output` is the live
    # object and may have moved on by the time a consumer on another thread reads it); None: not asked
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[dict[int, float]] | None = None


@runtime_checkable
class TokenizerProtocol(Protocol):
    """dsv3.tokenizer.Tokenizer, or any object with the same four members."""

    @property
    def bos_id(self) -> int | None:
        """Put in front of a text prompt (documents start with it in training); None: nothing is."""
        ...

    @property
    def eos_id(self) -> int | None:
        """Ends generation (besides the model config's eos_token_id); None: only the config's does."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@runtime_checkable
class EngineProtocol(Protocol):
    """Requests in, tokens out. Single-threaded: one caller (the server's engine thread) drives it."""

    @property
    def max_batch_size(self) -> int:
        """Requests decoded at once (over all decode workers)."""
        ...

    @property
    def max_seq_len(self) -> int:
        """Prompt plus generated tokens of one request."""
        ...

    @property
    def kv_cache_bytes_per_token(self) -> int: ...

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Text or token ids -> validated token ids; ValueError on bad input."""
        ...

    def add_request(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> RequestOutput:
        """Queue a request; ValueError (and nothing changes) on bad input."""
        ...

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request wherever it is; None for an unknown id."""
        ...

    def step(self) -> list[StepOutput]:
        """Advance every request by what one step produces; one StepOutput per request that changed.
        A request that failed finishes with finish_reason "error" and its `output.error` says why."""
        ...

    def has_unfinished(self) -> bool: ...

    def num_running(self) -> int:
        """Requests decoding now."""
        ...

    def num_waiting(self) -> int:
        """Requests accepted but not decoding yet (queued, or being prefilled)."""
        ...

    def expert_load(self) -> torch.Tensor | None:
        """Recent tokens per routed expert [MoE layers, experts]; None when this engine does not record it."""
        ...

    def close(self) -> None:
        """Release what the engine holds (worker processes); idempotent."""
        ...
