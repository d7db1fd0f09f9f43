"""`add`: a + b with `digits`-digit operands; the answer is the sum as a plain integer.

The reasoning generator writes the schoolbook column addition from the right, one line per column with
its carry, so a model trained on it (the teacher in distillation) can carry digit by digit:

    <think>
    7+8+0=15 write 5 carry 1
    5+6+1=12 write 2 carry 1
    4+3+1=8 write 8 carry 0
    </think>
    825
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from dsv3.tasks.base import Problem, Task

_INT = re.compile(r"[+-]?\d+")


@dataclass
class AddTask(Task):
    """a + b, each operand drawn uniformly from the `digits`-digit numbers (0..9 when digits=1)."""

    digits: int = 3
    heldout: float = 0.1
    name: ClassVar[str] = "add"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> AddTask:
        if isinstance(self.digits, bool) or not isinstance(self.digits, int) or not 1 <= self.digits <= 18:
            raise ValueError(f"add: digits must be an integer in [1, 18], got {self.digits!r}")
        super().validate()
        return self

    def draw(self, rng: random.Random) -> Problem:
        lo = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        a, b = rng.randint(lo, 10**self.digits - 1), rng.randint(lo, 10**self.digits - 1)
        return self.problem(a, b)

    def problem(self, a: int, b: int) -> Problem:
        lo, hi = sorted((a, b))
        return Problem(
            task=self.name,
            key=f"{lo}+{hi}",  # a+b and b+a are one problem: the same split
            prompt=f"What is {a}+{b}?",
            answer=str(a + b),
            data={"a": a, "b": b},
        )

    def parse_answer(self, answer: str) -> int | None:
        return int(answer) if _INT.fullmatch(answer) else None

    def check(self, problem: Problem, parsed: int) -> bool:
        return parsed == problem.data["a"] + problem.data["b"]

    def reasoning(self, problem: Problem) -> str:
        a, b = str(problem.data["a"]), str(problem.data["b"])
        width = max(len(a), len(b))
        a, b = a.zfill(width), b.zfill(width)
        lines, carry = [], 0
        for da, db in zip(reversed(a), reversed(b)):
            s = int(da) + int(db) + carry
            lines.append(f"{da}+{db}+{carry}={s} write {s % 10} carry {s // 10}")
            carry = s // 10
        if carry:
            lines.append(f"carry {carry} gives the leading digit {carry}")
        return "\n".join(lines)
