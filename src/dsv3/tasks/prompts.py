"""Problems in, sampled responses out: chat-rendered prompts batched through dsv3's engine.

A problem's prompt is one user message rendered by the model's chat template with the generation prompt
(`dsv3.chat`, DeepSeek-V3's template by default) and tokenized with special tokens parsed, exactly as SFT
tokenizes it. DeepSeek-V3's generation prompt ends `<｜Assistant｜><think>\\n`: the model continues inside the
think block, so the opening the template supplied (`response_prefix`) is put back in front of the generated
text before a verifier reads it: the response is `<think>\\nreasoning</think>answer`, as the teacher wrote it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dsv3.chat import ChatTokenizer, encode_chat, render
from dsv3.inference import RequestOutput, SamplingParams
from dsv3.tasks.base import THINK_OPEN, Problem


class Generator(Protocol):
    """What sampling needs: dsv3.inference.LLM (its tokenizer and generate)."""

    @property
    def tokenizer(self) -> ChatTokenizer | None: ...

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[RequestOutput]: ...


def user_messages(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "user", "content": problem.prompt}]


def prompt_ids(tokenizer: ChatTokenizer, problem: Problem, think: bool = True) -> list[int]:
    """The token ids of the problem's chat prompt (generation prompt included; think=False: without the
    think block the generation prompt opens)."""
    ids, _ = encode_chat(tokenizer, user_messages(problem), add_generation_prompt=True)
    prefix = response_prefix(tokenizer)
    if think or not prefix:
        return ids
    cut, _ = tokenizer.encode_with_offsets(prefix)
    if ids[-len(cut) :] != cut:
        raise ValueError(f"the chat prompt does not end with the tokens of {prefix!r}: cannot drop them")
    return ids[: -len(cut)]


def response_prefix(tokenizer: ChatTokenizer) -> str:
    """What the generation prompt opens of the response: `<think>\\n` under DeepSeek-V3's template."""
    msgs = [{"role": "user", "content": "x"}]
    base = render(msgs, tokenizer=tokenizer)
    cue = render(msgs, add_generation_prompt=True, tokenizer=tokenizer)
    cue = cue[len(base) :] if cue.startswith(base) else ""
    return cue[cue.index(THINK_OPEN) :] if THINK_OPEN in cue else ""


@dataclass
class Sample:
    """One generated response: its full text (response prefix included) and generated token count."""

    text: str
    num_tokens: int
    finish_reason: str | None


def sampling_plan(
    num_problems: int,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    top_p: float = 1.0,
    seed: int = 0,
    greedy: bool = False,
) -> list[list[SamplingParams]]:
    """Per problem: an optional greedy request, then `samples` sampled ones. Sample j of problem i has
    seed (seed << 32) + i * samples + j: reproducible, and no two requests share a random stream."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    plan = []
    for i in range(num_problems):
        row = [SamplingParams(max_new_tokens=max_new_tokens, temperature=0)] if greedy else []
        row += [
            SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=(seed << 32) + i * samples + j,
            )
            for j in range(samples)
        ]
        plan.append([p.validate() for p in row])
    return plan


def sample_responses(
    llm: Generator,
    problems: Sequence[Problem],
    plan: Sequence[Sequence[SamplingParams]],
    think: bool = True,
) -> list[list[Sample]]:
    """For problem i, one response per SamplingParams in plan[i], all batched in one engine run
    (continuous batching). Result [problem][request]. think: see `prompt_ids`."""
    if len(plan) != len(problems):
        raise ValueError(f"got {len(plan)} rows of SamplingParams for {len(problems)} problems")
    tok = llm.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer: chat prompts need one (tokenizer.json)")
    prefix = response_prefix(tok) if think else ""
    prompts, params = [], []
    for p, row in zip(problems, plan):
        ids = prompt_ids(tok, p, think)
        prompts += [ids] * len(row)
        params += list(row)
    outs = iter(llm.generate(prompts, params) if prompts else [])
    return [
        [Sample(prefix + o.text, len(o.token_ids), o.finish_reason) for o in (next(outs) for _ in row)]
        for row in plan
    ]
