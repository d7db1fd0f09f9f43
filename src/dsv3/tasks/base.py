"""Verifiable tasks: a problem generator with a fixed held-out split, a verifier and a reward.

Answer format (every task): a response may open with reasoning inside one `<think>...</think>` block; the
answer is the text after `</think>` (the whole response when there is no block), stripped of whitespace.
A task parses that answer with its own grammar (`add`: an integer; `countdown`: an arithmetic equation).

    <think>
    7+8=15 write 5 carry 1 ...
    </think>
    825

Reward (`Task.reward`): 1.0 when the answer is correct, 0.1 when the response is well formed (think block,
if any, closed exactly once; answer parses) but wrong, 0.0 otherwise.

Held-out split: a problem's split is a pure function of the problem, `sha256(task name | canonical key)`
mapped to [0, 1): below `heldout` it is "test", otherwise "train". A training stream (`sample`,
`split("train", n)`, `sft_records`) therefore never yields a held-out problem, whatever its seed, and the
held-out set is the same on every machine. The canonical key is order-free where the problem is (a+b and
b+a land in the same split).
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """One prompt with what a verifier needs. `key` identifies the problem (it decides the split);
    `answer` is a reference answer (None when unknown, e.g. a prompts file without answers)."""

    task: str
    key: str
    prompt: str
    answer: str | None = None
    data: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def split_response(response: str) -> tuple[str | None, str] | None:
    """response -> (reasoning or None, answer text), or None when the think block is malformed
    (an unclosed `<think>`, a stray `</think>`, more than one block, or text before `<think>`)."""
    text = response.strip()
    n_open, n_close = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if n_open == 0 and n_close == 0:
        return None, text
    if n_open != 1 or n_close != 1 or not text.startswith(THINK_OPEN):
        return None
    reasoning, answer = text[len(THINK_OPEN) :].split(THINK_CLOSE, 1)
    return reasoning.strip(), answer.strip()


def format_response(answer: str, reasoning: str | None = None) -> str:
    """The assistant text for an answer, with its reasoning in a think block when given."""
    return answer if reasoning is None else f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{answer}"


def split_of(task: str, key: str, heldout: float) -> str:
    """ "test" for a `heldout` fraction of problems chosen by a hash of (task, key), else "train"."""
    h = hashlib.sha256(f"{task}|{key}".encode()).digest()
    return "test" if int.from_bytes(h[:8], "big") / 2.0**64 < heldout else "train"


class Task(ABC):
    """A verifiable task. Subclasses (dataclasses) define `name`, `draw`, `parse_answer`, `check`, and
    optionally `reasoning`; the split, reward and training-record logic lives here, once."""

    name: str
    heldout: float = 0.1

    # --------------------------------------------------------------- what a task defines
    @abstractmethod
    def draw(self, rng: random.Random) -> Problem:
        """A random problem from the whole problem space (either split)."""

    @abstractmethod
    def parse_answer(self, answer: str) -> Any | None:
        """The parsed answer text, or None when it does not follow the task's answer grammar."""

    @abstractmethod
    def check(self, problem: Problem, parsed: Any) -> bool:
        """Whether a parsed answer solves the problem."""

    def reasoning(self, problem: Problem) -> str:
        """Worked reasoning for the reference answer (the think block of training records)."""
        raise ValueError(f"task {self.name!r} has no reasoning generator")

    def validate(self) -> Task:
        if not 0 < self.heldout < 1:
            raise ValueError(f"{self.name}: heldout must be in (0, 1), got {self.heldout!r}")
        return self

    # --------------------------------------------------------------- splits
    def split_of(self, problem: Problem) -> str:
        return split_of(self.name, problem.key, self.heldout)

    def sample(self, rng: random.Random, split: str = "train", max_tries: int = 10_000) -> Problem:
        """A random problem of `split` (rejection sampling over `draw`)."""
        _check_split(split)
        for _ in range(max_tries):
            p = self.draw(rng)
            if self.split_of(p) == split:
                return p
        raise ValueError(f"{self.name}: no {split} problem in {max_tries} draws (heldout={self.heldout})")

    def split(self, name: str, n: int, seed: int = 0) -> list[Problem]:
        """The first n distinct problems of split `name`, the same list on every call and machine
        (test: the held-out evaluation set; train: a training stream, `seed` picks which)."""
        _check_split(name)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        rng = random.Random(f"{self.name}|{name}|{seed}")
        seen: dict[str, Problem] = {}
        misses = 0
        while len(seen) < n:
            p = self.draw(rng)
            if self.split_of(p) != name or p.key in seen:
                misses += 1
                if misses > 1000 + 100 * n:
                    raise ValueError(
                        f"{self.name}: only {len(seen)} distinct {name} problems found, {n} asked "
                        "(the problem space is too small: ask for fewer or make the task larger)"
                    )
                continue
            seen[p.key] = p
        return list(seen.values())

    # --------------------------------------------------------------- verifier and reward
    def answer_of(self, problem: Problem, response: str) -> Any | None:
        parts = split_response(response)
        return None if parts is None or not parts[1] else self.parse_answer(parts[1])

    def well_formed(self, response: str) -> bool:
        """The think block (if any) is well formed and the answer follows the task's grammar."""
        parts = split_response(response)
        return parts is not None and bool(parts[1]) and self.parse_answer(parts[1]) is not None

    def verify(self, problem: Problem, response: str) -> bool:
        parsed = self.answer_of(problem, response)
        return parsed is not None and self.check(problem, parsed)

    def reward(self, problem: Problem, response: str) -> float:
        """1.0 correct, 0.1 well formed but wrong, 0.0 otherwise."""
        parsed = self.answer_of(problem, response)
        if parsed is None:
            return 0.0
        return 1.0 if self.check(problem, parsed) else 0.1

    # --------------------------------------------------------------- training data
    def reference_response(self, problem: Problem, reasoning: bool = False) -> str:
        if problem.answer is None:
            raise ValueError(f"{self.name}: problem {problem.key!r} has no reference answer")
        return format_response(problem.answer, self.reasoning(problem) if reasoning else None)

    def sft_records(
        self, n: int, split: str = "train", reasoning: bool = False, seed: int = 0, chat: bool = True
    ) -> list[dict[str, Any]]:
        """n TRL-style `{"messages": [user, assistant]}` records (JSONL-writable) from `split`; with
        reasoning=True the assistant turn holds the worked reasoning in a think block before the answer.
        chat=False gives TRL's standard prompt-completion records instead, `{"prompt": raw prompt,
        "completion": " " + response}`, for a base model that continues raw text (`dsv3 sft` puts the
        loss on the completion only)."""
        problems = self.split(split, n, seed=seed)
        if not chat:
            return [
                {"prompt": p.prompt, "completion": " " + self.reference_response(p, reasoning)}
                for p in problems
            ]
        return [
            {
                "messages": [
                    {"role": "user", "content": p.prompt},
                    {"role": "assistant", "content": self.reference_response(p, reasoning)},
                ]
            }
            for p in problems
        ]


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
