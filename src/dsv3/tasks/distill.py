"""`dsv3 distill`: distillation data by rejection sampling (report §5.1, Table 9, at small scale).

    dsv3 distill --teacher runs/add-teacher --task add:digits=3 --samples 4 --temperature 0.7 --out d.jsonl
    dsv3 distill --teacher RUN --prompts prompts.jsonl --reward mypkg.rewards:score --out d.jsonl

K samples per prompt from the teacher, batched through the engine; a sample is kept when the task's
verifier accepts it (or, with `--reward module:function`, when its reward exceeds `--threshold`). Kept
samples are written atomically as TRL messages JSONL, one record per kept sample:

    {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]}

where RESPONSE is the teacher's text as produced, its reasoning inside `<think>...</think>` before the
answer (the `<think>` the chat template's generation prompt opened is put back in front). Prompts of a task
come from its training split only (never the held-out one `dsv3 eval` scores). A prompts file is JSONL with
a "prompt" field and optional "answer" (both reach the reward function in the Problem it is called with).
One JSON line reports the acceptance rate.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.inference import LLM
from dsv3.io import atomic_write, read_jsonl
from dsv3.tasks.base import Problem, Task, split_response
from dsv3.tasks.prompts import Generator, sample_responses, sampling_plan, user_messages
from dsv3.tasks.registry import RewardFn, get_task, load_reward

Accept = Callable[[Problem, str], bool]


@dataclass
class DistillConfig:
    """samples: K per prompt; require_think: also reject responses without reasoning (no think block, or
    an empty one)."""

    samples: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    require_think: bool = False
    think: bool = True  # False: prompts without the think opening (see dsv3.tasks.prompts)

    def validate(self) -> DistillConfig:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        sampling_plan(1, 1, self.temperature, self.max_new_tokens, self.top_p, self.seed)
        return self


@dataclass
class DistillResult:
    records: list[dict[str, Any]]
    prompts: int
    samples: int

    @property
    def accepted(self) -> int:
        return len(self.records)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.samples if self.samples else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "samples": self.samples,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
        }


def acceptor(task: Task | None = None, reward: RewardFn | None = None, threshold: float = 0.5) -> Accept:
    """The acceptance rule: reward(problem, response) > threshold when a reward function is given, else
    the task's verifier."""
    if reward is not None:

        def by_reward(problem: Problem, response: str) -> bool:
            value = reward(problem, response)
            if not isinstance(value, int | float):
                raise ValueError(f"the reward function returned {type(value).__name__}, not a number")
            return value > threshold

        return by_reward
    if task is None:
        raise ValueError("accepting samples needs a task's verifier or a reward function (--reward)")
    return task.verify


def rejection_sample(
    llm: Generator, problems: list[Problem], accept: Accept, config: DistillConfig | None = None
) -> DistillResult:
    """K samples per problem through the engine (one batched run); the accepted ones as messages records."""
    cfg = (config or DistillConfig()).validate()
    plan = sampling_plan(len(problems), cfg.samples, cfg.temperature, cfg.max_new_tokens, cfg.top_p, cfg.seed)
    results = sample_responses(llm, problems, plan, think=cfg.think)
    records = []
    for problem, samples in zip(problems, results):
        for s in samples:
            if cfg.require_think and not _reasoning(s.text):
                continue
            if accept(problem, s.text):
                msgs = [*user_messages(problem), {"role": "assistant", "content": s.text.strip()}]
                records.append({"messages": msgs})
    return DistillResult(records, prompts=len(problems), samples=len(problems) * cfg.samples)


def _reasoning(response: str) -> str | None:
    parts = split_response(response)
    return None if parts is None else parts[0]


def load_prompts(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file of {"prompt": str, "answer"?: str, ...} records."""
    problems = []
    for n, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise ValueError(f'{path}:{n}: each line must be an object with a non-empty "prompt" string')
        answer = rec.get("answer")
        problems.append(
            Problem(
                task="prompts",
                key=str(n),
                prompt=rec["prompt"],
                answer=None if answer is None else str(answer),
                data=rec,
            )
        )
    if not problems:
        raise ValueError(f"{path} holds no prompts")
    return problems


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """All records as JSONL, replacing `path` atomically."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(path, data.encode("utf-8"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DistillConfig()
    parser.add_argument("--teacher", required=True, help="teacher run directory or HF model directory")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="task spec: add, add:digits=5, countdown, or module:function")
    src.add_argument("--prompts", help='JSONL with a "prompt" field (and optional "answer"); needs --reward')
    parser.add_argument("--reward", help="reward function module:function, fn(problem, response) -> float")
    parser.add_argument("--threshold", type=float, default=0.5, help="keep samples with reward > this")
    parser.add_argument("--samples", type=int, default=d.samples, help="K samples per prompt")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--limit", type=int, default=100, help="prompts (task: from its training split)")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--seed", type=int, default=d.seed, help="sampling seed (and the task's stream)")
    parser.add_argument(
        "--no-think", action="store_true", help="prompt without the <think> opening (answer directly)"
    )
    parser.add_argument("--require-think", action="store_true", help="reject responses without reasoning")
    parser.add_argument("--out", required=True, help="output JSONL (written atomically)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    reward = load_reward(args.reward) if args.reward else None
    if args.prompts:
        if reward is None:
            raise ValueError("--prompts has no verifier: give --reward module:function")
        task, problems = None, load_prompts(args.prompts)[: args.limit]
    else:
        task = get_task(args.task)
        problems = task.split("train", args.limit, seed=args.seed)
    cfg = DistillConfig(
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        require_think=args.require_think,
        think=not args.no_think,
    ).validate()
    llm = LLM(
        args.teacher, dtype=args.dtype, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len
    )
    result = rejection_sample(llm, problems, acceptor(task, reward, args.threshold), cfg)
    write_jsonl(args.out, result.records)
    print(json.dumps({**result.summary(), "out": str(args.out)}), flush=True)
    return 0
