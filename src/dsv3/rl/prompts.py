"""GRPO's prompts: a task's train split or a JSONL prompts file, step s's batch a pure function of (seed,
s), so a resumed run samples exactly what the uninterrupted one did. Extra columns of a prompts file
reach the reward functions by name."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsv3.chat import encode_chat
from dsv3.io import read_jsonl
from dsv3.tasks import Task
from dsv3.tasks.prompts import prompt_ids, response_prefix
from dsv3.tokenizer import Tokenizer


@dataclass
class PromptRecord:
    """One prompt: as the reward functions see it, its token ids, and its extra columns."""

    prompt: Any  # a string or a list of messages
    ids: list[int]
    columns: dict[str, Any]


class PromptSource:
    """Prompts for step s, a pure function of (seed, s): a task's train split or a prompts file."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        task: Task | None = None,
        path: str | Path | None = None,
        think: bool = True,
        seed: int = 0,
    ):
        if (task is None) == (path is None):
            raise ValueError("give a task or a prompts file (exactly one)")
        self.task, self.tokenizer, self.think, self.seed = task, tokenizer, think, seed
        self.records: list[dict[str, Any]] = []
        if path is not None:
            self.records = load_prompt_records(path)

    def batch(self, step: int, n: int) -> list[PromptRecord]:
        if self.task is not None:
            rng = random.Random(f"grpo|{self.seed}|{step}")
            problems = [self.task.sample(rng, "train") for _ in range(n)]
            return [
                PromptRecord(
                    p.prompt, prompt_ids(self.tokenizer, p, self.think), {"problem": p, "answer": p.answer}
                )
                for p in problems
            ]
        out, N = [], len(self.records)
        perms: dict[int, np.ndarray] = {}  # a seeded permutation of the records per epoch
        for k in range(step * n, step * n + n):
            epoch, i = divmod(k, N)
            if epoch not in perms:
                perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(N)
            rec = self.records[int(perms[epoch][i])]
            out.append(
                PromptRecord(
                    rec["prompt"],
                    self.encode(rec["prompt"]),
                    {k2: v for k2, v in rec.items() if k2 != "prompt"},
                )
            )
        return out

    def encode(self, prompt: Any) -> list[int]:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids, _ = encode_chat(self.tokenizer, msgs, add_generation_prompt=True)
        prefix = response_prefix(self.tokenizer)
        if not self.think and prefix:
            cut = self.tokenizer.encode_with_offsets(prefix)[0]
            if ids[-len(cut) :] == cut:
                ids = ids[: -len(cut)]
        return ids


def load_prompt_records(path: str | Path) -> list[dict[str, Any]]:
    """A prompts file: JSONL of {"prompt": string or messages, ...extra columns}."""
    recs = []
    for n, rec in read_jsonl(path):
        prompt = rec.get("prompt") if isinstance(rec, dict) else None
        ok_msgs = (
            isinstance(prompt, list)
            and prompt
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt
            )
        )
        if not (isinstance(prompt, str) and prompt) and not ok_msgs:
            raise ValueError(f'{path}:{n}: "prompt" must be a non-empty string or a list of messages')
        recs.append(rec)
    if not recs:
        raise ValueError(f"{path} holds no prompts")
    return recs
