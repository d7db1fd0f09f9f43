"""From engine requests to OpenAI choices: `fan_out` makes a prompt's n (or best_of) samples with distinct
reproducible seeds, `Plan` says how the engine's outputs map onto choices, `choice` renders one."""

from __future__ import annotations

from dataclasses import dataclass, replace

from dsv3.inference.protocol import RequestOutput
from dsv3.inference.sampling import SamplingParams
from dsv3.serving import logprobs as lp_layout


def derive_seed(seed: int | None, i: int) -> int | None:
    """Sample i's seed: the request's own for sample 0, a distinct reproducible one for the others."""
    if seed is None or i == 0:
        return seed
    return (seed ^ (i * 0x9E3779B97F4A7C15)) % 2**63


def fan_out(params: SamplingParams, count: int) -> list[SamplingParams]:
    """count samples of one prompt (n / best_of), each with its own seed (derive_seed)."""
    return [replace(params, seed=derive_seed(params.seed, i)) for i in range(count)]


@dataclass
class Plan:
    """How engine outputs (prompt p's samples at items p*best_of ..) become choices."""

    chat: bool
    n: int
    best_of: int
    prompt_lens: list[int]
    logprobs: int | None  # completions: `logprobs`; chat: top_logprobs when logprobs is true; else None
    echo: list[str] | None = None  # completions with echo: each prompt's text
    zero_width: list[int] | None = None  # per prompt: 1 when its first token is an added BOS


def choice(ts: lp_layout.TokenStrings, plan: Plan, p: int, index: int, o: RequestOutput) -> dict:
    """Choice `index` of the response: sample o of prompt p, in the endpoint's layout."""
    if plan.chat:
        lps = None
        if plan.logprobs is not None:
            lps = lp_layout.chat(ts, o.token_ids, o.logprobs, o.top_logprobs, plan.logprobs)
        msg = {"role": "assistant", "content": o.text}
        return {"index": index, "message": msg, "logprobs": lps, "finish_reason": o.finish_reason}
    prefix = plan.echo[p] if plan.echo is not None else ""
    lps = None
    if plan.logprobs is not None:
        lps = lp_layout.legacy(ts, o.token_ids, o.logprobs, o.top_logprobs, start=len(prefix))
        if plan.echo is not None:
            pre = lp_layout.legacy(
                ts, o.prompt_token_ids, o.prompt_logprobs, o.prompt_top_logprobs, 0, plan.zero_width[p]
            )
            lps = lp_layout.concat(pre, lps)
    return {"index": index, "text": prefix + o.text, "logprobs": lps, "finish_reason": o.finish_reason}
