"""Sampling parameters and the per-row sampler.

Every row of a batch has its own SamplingParams and its own `torch.Generator`, so a request's random
draws depend only on its seed and on its own logits, never on which other requests share the batch.
Rows with temperature 0 are greedy (argmax) and draw nothing.

Numerics: logits are processed in float32 in the order logit_bias and penalties -> temperature -> top-k ->
top-p (as vLLM and HF do). OpenAI's penalties: logit[j] -= c[j] * frequency_penalty + (c[j] > 0) *
presence_penalty, c[j] = how often token j was generated so far in this request (the prompt not counted);
logit_bias[j] is added as it is.
top-p keeps the smallest set of most likely tokens whose probability reaches top_p (always at least one).
A token is drawn by inverse CDF: u ~ U[0, 1) from the row's generator, token = first index whose
cumulative probability exceeds u * total. Zero-probability tokens can never be drawn.

Log-probabilities (`logprobs`, `prompt_logprobs`): "raw" is log_softmax of the model's logits before
temperature, penalties, logit_bias and top-k/top-p (vLLM's default; what OpenAI clients and evaluation
harnesses expect, and well defined at temperature 0); "processed" is log_softmax((logits + bias -
penalties) / temperature), the tempered policy an RL loss scores (`dsv3.rl.loss.token_logprobs`; top-k/top-p
truncation is not renormalised into it). Prompt log-probabilities are always raw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

LOGPROBS_MODES = ("raw", "processed")
MAX_LOGPROBS = 20  # OpenAI's limit on top alternatives


@dataclass
class SamplingParams:
    """How to continue one prompt. temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens besides EOS
    seed: int | None = None  # per-request seed: same seed, same output
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    # record each generated token's log-probability and its top-`logprobs` alternatives (0 = chosen only)
    logprobs: int | None = None
    logprobs_mode: str = "raw"  # "raw" | "processed" (module docstring)
    prompt_logprobs: int | None = None  # the prompt tokens' raw log-probabilities, top alternatives
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added logit, in [-100, 100]

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = dict(self.logit_bias)

    @property
    def adjusts_logits(self) -> bool:
        """True when logit_bias or a penalty changes the logits before temperature."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0

    def extra_fields(self) -> list[str]:
        """The fields set beyond plain sampling (for engines that support only that)."""
        set_ = {
            "logprobs": self.logprobs is not None,
            "prompt_logprobs": self.prompt_logprobs is not None,
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        }
        return [n for n, on in set_.items() if on]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the bad field; return self."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 0 or (self.max_new_tokens == 0 and self.prompt_logprobs is None):
            raise ValueError(
                f"max_new_tokens must be >= 1 (0 only to score a prompt, with prompt_logprobs), "
                f"got {self.max_new_tokens}"
            )
        t = self.temperature
        if not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not isinstance(p, int | float) or not (0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        for i in self.stop_token_ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {i!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name, v in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            bad = isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS
            if v is not None and bad:
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        pen = (("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty))
        for name, v in pen:
            if isinstance(v, bool) or not isinstance(v, int | float) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        for k, v in self.logit_bias.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {k!r}")
            if isinstance(v, bool) or not isinstance(v, int | float) or not -100 <= v <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {v!r} for {k}")
        return self


def adjust_logits(
    logits: torch.Tensor, params: Sequence[SamplingParams], generated: Sequence[Sequence[int]]
) -> torch.Tensor:
    """logits [N, V] -> float32 logits with each row's logit_bias added and OpenAI's penalties subtracted:
    logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, c = counts of generated[i].
    Rows that adjust nothing are returned as they are (no copy when no row does)."""
    x = logits.float()
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return x
    x = x.clone()
    V = x.shape[-1]
    for i in rows:
        p = params[i]
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=x.device)
            x[i].index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=x.dtype, device=x.device))
        if (p.presence_penalty or p.frequency_penalty) and generated[i]:
            c = torch.bincount(torch.tensor(generated[i], dtype=torch.long), minlength=V)[:V]
            c = c.to(x.device, torch.float32)
            x[i] -= c * p.frequency_penalty + (c > 0).float() * p.presence_penalty
    return x


def log_softmax_rows(
    raw: torch.Tensor, adjusted: torch.Tensor, params: Sequence[SamplingParams]
) -> torch.Tensor:
    """[N, V] float32 log-probabilities in each row's logprobs_mode: log_softmax(raw) ("raw"), or
    log_softmax(adjusted / temperature) ("processed"; greedy rows temperature 1)."""
    out = torch.log_softmax(raw.float(), dim=-1)
    proc = [i for i, p in enumerate(params) if p.logprobs_mode == "processed"]
    if proc:
        idx = torch.tensor(proc, device=raw.device)
        temp = torch.tensor(
            [params[i].temperature if params[i].temperature > 0 else 1.0 for i in proc], device=raw.device
        )
        out[idx] = torch.log_softmax(adjusted[idx].float() / temp[:, None], dim=-1)
    return out


def top_logprobs(
    logp: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int]
) -> tuple[list[float], list[dict[int, float] | None]]:
    """logp [N, V], tokens [N], ks [N] -> (log p(token) per row, per row a dict of its top-ks[i] tokens
    plus the chosen one, sorted by log-probability, most likely first; None where ks[i] is 0)."""
    chosen = logp.gather(1, tokens.to(logp.device).view(-1, 1)).squeeze(1).tolist()
    k = max(ks, default=0)
    tops: list[dict[int, float] | None] = [None] * len(ks)
    if k > 0:
        vals, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
        toks = tokens.tolist()
        for i, ki in enumerate(ks):
            if ki > 0:
                d = dict(zip(ids[i][:ki], vals[i][:ki]))
                d.setdefault(toks[i], chosen[i])
                tops[i] = dict(sorted(d.items(), key=lambda kv: -kv[1]))
    return chosen, tops


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [N, V] -> float32 logits after temperature, top-k and top-p (removed tokens at -inf).

    Greedy rows (temperature 0) come back unscaled and unfiltered."""
    x = logits.float()
    N, V = x.shape
    dev = x.device
    temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    x = x / temp[:, None]
    ks = [p.top_k if (p.top_k and p.top_k < V and not p.greedy) else V for p in params]
    ps = [1.0 if p.greedy else float(p.top_p) for p in params]
    if all(k == V for k in ks) and all(p >= 1.0 for p in ps):
        return x
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=dev)
    remove = rank[None, :] >= torch.tensor(ks, device=dev)[:, None]  # top-k
    sorted_x = sorted_x.masked_fill(remove, float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    remove = before >= torch.tensor(ps, device=dev)[:, None]  # top-p (the first token always stays)
    sorted_x = sorted_x.masked_fill(remove, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter_(1, order, sorted_x)


def probs_from_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution each row samples from, [N, V] float32. Greedy rows get a one-hot at the argmax."""
    x = filter_logits(logits, params)
    probs = x.softmax(dim=-1)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        g = torch.tensor(greedy, device=x.device)
        probs[g] = torch.zeros_like(probs[g]).scatter_(1, x[g].argmax(dim=-1, keepdim=True), 1.0)
    return probs


def uniforms(generators: Sequence[torch.Generator | None] | torch.Generator | None, n: int) -> torch.Tensor:
    """n uniforms in [0, 1): one per row from that row's generator, or all from one shared generator."""
    if generators is None or isinstance(generators, torch.Generator):
        return torch.rand(n, generator=generators, dtype=torch.float64)
    if len(generators) != n:
        raise ValueError(f"need one generator per row: {len(generators)} generators for {n} rows")
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [N, V] (need not be normalised), u [N] in [0, 1) -> token ids [N] (long)."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | torch.Generator | None = None,
) -> torch.Tensor:
    """logits [N, V] -> next token ids [N] (long). Greedy rows take the argmax and consume no randomness."""
    N = logits.shape[0]
    if len(params) != N:
        raise ValueError(f"need one SamplingParams per row: {len(params)} for {N} rows")
    out = logits.float().argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    if len(rows) == N:
        sub_logits, sub_params, sub_gens = logits, params, generators
    else:
        idx = torch.tensor(rows, device=logits.device)
        sub_logits, sub_params = logits[idx], [params[i] for i in rows]
        sub_gens = generators if not isinstance(generators, Sequence) else [generators[i] for i in rows]
    probs = filter_logits(sub_logits, sub_params).softmax(dim=-1)
    tokens = draw(probs, uniforms(sub_gens, len(rows)))
    if len(rows) == N:
        return tokens.to(out.device)
    out[torch.tensor(rows, device=out.device)] = tokens.to(out.device)
    return out
