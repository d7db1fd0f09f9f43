"""`countdown`: reach a target from 3-4 small numbers, each used exactly once, with + - * / and brackets.

Problems are reachable by construction: the generator combines the shuffled numbers pairwise with random
operations (Countdown's rules: intermediate results stay positive integers) and takes the result as the
target; that expression is the reference answer, and its steps are the reasoning.

The answer is an equation `EXPR` or `EXPR = TARGET`. The verifier parses it with a small recursive-descent
parser (integers, + - * /, parentheses, nothing else: no eval of arbitrary code) and evaluates it exactly
with fractions: correct when the integers used are exactly the problem's numbers (as a multiset: each once,
none missing, none added), the value equals the target, and a stated right-hand side equals it too.
Division by zero is well formed but wrong.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from dsv3.tasks.base import Problem, Task

MAX_ANSWER_CHARS = 256
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()=]))")


@dataclass(frozen=True)
class Equation:
    """A parsed answer: the integers it uses (in order), its exact value (None on division by zero),
    and the right-hand side after `=` when one is written."""

    numbers: tuple[int, ...]
    value: Fraction | None
    rhs: int | None


def _tokens(text: str) -> list[str] | None:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            return None
        out.append(m.group(1) or m.group(2))
        pos = m.end()
    return out


class _Parser:
    """expr := term (('+'|'-') term)*; term := atom (('*'|'/') atom)*; atom := INT | '(' expr ')'."""

    def __init__(self, toks: list[str]):
        self.toks, self.i, self.numbers = toks, 0, []

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expr(self) -> Fraction | None:
        v = self.term()
        while self.peek() in ("+", "-"):
            op, w = self.take(), self.term()
            v = None if v is None or w is None else (v + w if op == "+" else v - w)
        return v

    def term(self) -> Fraction | None:
        v = self.atom()
        while self.peek() in ("*", "/"):
            op, w = self.take(), self.atom()
            if v is None or w is None or (op == "/" and w == 0):
                v = None
            else:
                v = v * w if op == "*" else v / w
        return v

    def atom(self) -> Fraction | None:
        tok = self.peek()
        if tok is None:
            raise SyntaxError("unexpected end")
        self.take()
        if tok.isdigit():
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        if tok == "(":
            v = self.expr()
            if self.peek() != ")":
                raise SyntaxError("missing )")
            self.take()
            return v
        raise SyntaxError(f"unexpected {tok!r}")


def parse_equation(text: str) -> Equation | None:
    """`EXPR` or `EXPR = INT` -> Equation, or None when the text is not such an equation."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    toks = _tokens(text)
    if not toks:
        return None
    rhs = None
    if "=" in toks:
        at = toks.index("=")
        if toks.count("=") != 1 or at != len(toks) - 2 or not toks[-1].isdigit():
            return None
        rhs, toks = int(toks[-1]), toks[:at]
    p = _Parser(toks)
    try:
        value = p.expr()
    except SyntaxError:
        return None
    if p.i != len(toks):
        return None
    return Equation(tuple(p.numbers), value, rhs)


def solve(numbers: list[int], target: int) -> str | None:
    """An expression using every number once that equals target (exact, any rational intermediate), or
    None when the target is unreachable. Brute force: fine for the 3-4 numbers of this task."""
    items = [(Fraction(n), str(n)) for n in numbers]

    def rec(items: list[tuple[Fraction, str]]) -> str | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        for i, j in itertools.combinations(range(len(items)), 2):
            (a, ea), (b, eb) = items[i], items[j]
            rest = [x for k, x in enumerate(items) if k not in (i, j)]
            cands = [(a + b, f"({ea}+{eb})"), (a - b, f"({ea}-{eb})"), (b - a, f"({eb}-{ea})")]
            cands.append((a * b, f"({ea}*{eb})"))
            cands += [(a / b, f"({ea}/{eb})")] if b else []
            cands += [(b / a, f"({eb}/{ea})")] if a else []
            for c in cands:
                found = rec([*rest, c])
                if found is not None:
                    return found
        return None

    expr = rec(items)
    return None if expr is None else (expr[1:-1] if expr.startswith("(") and len(items) > 1 else expr)


@dataclass
class CountdownTask(Task):
    """Between min_numbers and max_numbers numbers in [1, max_number]; target in [1, max_target]."""

    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 10
    max_target: int = 100
    heldout: float = 0.1
    name: ClassVar[str] = "countdown"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> CountdownTask:
        fields = {
            "min_numbers": self.min_numbers,
            "max_numbers": self.max_numbers,
            "max_number": self.max_number,
            "max_target": self.max_target,
        }
        for f, v in fields.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"countdown: {f} must be a positive integer, got {v!r}")
        if not 2 <= self.min_numbers <= self.max_numbers <= 6:
            raise ValueError(
                f"countdown: need 2 <= min_numbers <= max_numbers <= 6, got {self.min_numbers}, "
                f"{self.max_numbers}"
            )
        if self.max_number < 2:
            raise ValueError(f"countdown: max_number must be >= 2, got {self.max_number}")
        super().validate()
        return self

    def draw(self, rng: random.Random) -> Problem:
        while True:
            k = rng.randint(self.min_numbers, self.max_numbers)
            numbers = [rng.randint(1, self.max_number) for _ in range(k)]
            target, expr, steps = _combine(numbers, rng)
            if 1 <= target <= self.max_target:
                return self.problem(numbers, target, answer=expr, steps=steps)

    def problem(
        self, numbers: list[int], target: int, answer: str | None = None, steps: list[str] | None = None
    ) -> Problem:
        """A problem from given numbers and target (answer=None: found by `solve`, None if unreachable)."""
        if answer is None:
            answer = solve(numbers, target)
        listed = ", ".join(map(str, numbers))
        return Problem(
            task=self.name,
            key=f"{','.join(map(str, sorted(numbers)))}->{target}",
            prompt=(
                f"Using the numbers {listed}, each exactly once, and + - * / with parentheses, make {target}."
            ),
            answer=answer,
            data={"numbers": list(numbers), "target": target, "steps": steps},
        )

    def parse_answer(self, answer: str) -> Equation | None:
        return parse_equation(answer)

    def check(self, problem: Problem, parsed: Equation) -> bool:
        target = problem.data["target"]
        return (
            sorted(parsed.numbers) == sorted(problem.data["numbers"])
            and parsed.value == target
            and (parsed.rhs is None or parsed.rhs == target)
        )

    def reasoning(self, problem: Problem) -> str:
        steps = problem.data.get("steps")
        if not steps:
            raise ValueError(f"countdown: problem {problem.key!r} has no recorded steps")
        return "\n".join(steps)


def _combine(numbers: list[int], rng: random.Random) -> tuple[int, str, list[str]]:
    """Combine shuffled numbers pairwise with random operations, intermediate results positive integers:
    (target, expression, steps)."""
    pool = [(n, str(n)) for n in numbers]
    rng.shuffle(pool)
    steps = []
    while len(pool) > 1:
        (a, ea), (b, eb) = pool.pop(), pool.pop()
        if a < b:
            (a, ea), (b, eb) = (b, eb), (a, ea)
        ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
        op = rng.choice(ops)
        v = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        steps.append(f"{a}{op}{b}={v}")
        expr = f"{ea}{op}{eb}" if not pool else f"({ea}{op}{eb})"
        pool.insert(rng.randrange(len(pool) + 1), (v, expr))
    return pool[0][0], pool[0][1], steps
