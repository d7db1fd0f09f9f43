"""`passkey`: a random key hidden at a chosen depth in filler text, retrieved on request (needle in a
haystack, the long-context check of the DeepSeek-V3 report, Figure 8; the passkey form of Mohtashami &
Jaggi, 2023).

    The grass is green. The sky is blue. ... The pass key is 48213. Remember it. 48213 is the pass key.
    ... There and back again. What is the pass key? The pass key is

`length` is the prompt's size in characters (whole filler sentences up to it; `chars_for_tokens` turns a
token budget into it for a tokenizer); `depth` in [0, 1] places the needle after that fraction of the
filler sentences (0: first, 1: just before the question). The answer is the leading integer of the
response, so the prompt works both as a chat question (`dsv3 eval --task passkey:length=2000,depth=0.5`)
and as raw text a pre-trained model continues (`passkey_sweep(..., chat=False)`).

`passkey_sweep` scores a model over a grid of lengths (in tokens) and depths: greedy accuracy per cell,
the report's heatmap as data; `python -m dsv3.tasks.passkey --checkpoint RUN --lengths 256,1024
--depths 0,0.5,1` prints it as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from dsv3.chat import ChatTokenizer
from dsv3.inference import SamplingParams
from dsv3.tasks.base import Problem, Task
from dsv3.tasks.prompts import Generator, sample_responses

FILLER = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
QUESTION = "What is the pass key? The pass key is"
_LEADING_INT = re.compile(r"(\d+)")


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


@dataclass
class PasskeyTask(Task):
    """A `digits`-digit key in about `length` characters of filler, at `depth` (0 = start, 1 = end)."""

    length: int = 2000
    depth: float = 0.5
    digits: int = 5
    heldout: float = 0.1
    name: ClassVar[str] = "passkey"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> PasskeyTask:
        if isinstance(self.digits, bool) or not isinstance(self.digits, int) or not 1 <= self.digits <= 12:
            raise ValueError(f"passkey: digits must be an integer in [1, 12], got {self.digits!r}")
        if not isinstance(self.depth, int | float) or not 0 <= self.depth <= 1:
            raise ValueError(f"passkey: depth must be in [0, 1], got {self.depth!r}")
        least = len(needle("0" * self.digits)) + len(QUESTION)
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < least:
            raise ValueError(f"passkey: length must be an integer >= {least} characters, got {self.length!r}")
        super().validate()
        return self

    def draw(self, rng: random.Random) -> Problem:
        lo = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        return self.problem(str(rng.randint(lo, 10**self.digits - 1)))

    def problem(self, key: str) -> Problem:
        """The prompt hiding `key`: whole filler sentences filling `length` around the needle."""
        room = self.length - len(needle(key)) - len(QUESTION)
        sentences: list[str] = []
        used = 0
        while used + len(FILLER[len(sentences) % len(FILLER)]) <= room:
            sentences.append(FILLER[len(sentences) % len(FILLER)])
            used += len(sentences[-1])
        at = round(self.depth * len(sentences))
        prompt = "".join(sentences[:at]) + needle(key) + "".join(sentences[at:]) + QUESTION
        return Problem(
            task=self.name,
            key=f"{self.length}|{self.depth}|{key}",
            prompt=prompt,
            answer=key,
            data={"key": key, "length": self.length, "depth": self.depth, "needle_at": at},
        )

    def parse_answer(self, answer: str) -> str | None:
        m = _LEADING_INT.match(answer.strip())
        return m.group(1) if m else None

    def check(self, problem: Problem, parsed: str) -> bool:
        return parsed == problem.data["key"]


def chars_for_tokens(tokenizer: ChatTokenizer, tokens: int, digits: int = 5) -> int:
    """The largest `length` (characters) whose passkey prompts take at most `tokens` tokens."""
    probe = PasskeyTask(length=max(200, 8 * tokens), digits=digits).problem("9" * digits).prompt
    ratio = len(probe) / len(tokenizer.encode_with_offsets(probe)[0])
    length = int(tokens * ratio)
    least = len(needle("0" * digits)) + len(QUESTION)
    while length > least:
        longest = max(
            len(tokenizer.encode_with_offsets(PasskeyTask(length, d, digits).problem("9" * digits).prompt)[0])
            for d in (0.0, 0.5, 1.0)
        )
        if longest <= tokens:
            return length
        length = int(length * tokens / longest) - 1
    raise ValueError(f"no passkey prompt fits in {tokens} tokens")


def passkey_sweep(
    llm: Generator,
    lengths: Sequence[int],
    depths: Sequence[float],
    n: int = 10,
    digits: int = 5,
    chat: bool = False,
) -> list[dict[str, Any]]:
    """Greedy retrieval accuracy of `llm` on `n` held-out keys per (length in tokens, depth) cell.

    chat=False feeds the raw prompt for a pre-trained model to continue; chat=True renders it as a user
    message (the `dsv3 eval` path, for a chat-tuned model). One record per cell, in grid order."""
    tok = llm.tokenizer
    if tok is None:
        raise ValueError("passkey_sweep needs the model's tokenizer (to size prompts in tokens)")
    cells, problems, tasks = [], [], []
    for length in lengths:
        chars = chars_for_tokens(tok, length, digits)
        for depth in depths:
            task = PasskeyTask(length=chars, depth=float(depth), digits=digits)
            ps = task.split("test", n)
            cells.append((length, float(depth), len(problems), len(ps)))
            problems += ps
            tasks += [task] * len(ps)
    greedy = SamplingParams(max_new_tokens=digits + 2, temperature=0)
    if chat:
        texts = [r[0].text for r in sample_responses(llm, problems, [[greedy]] * len(problems), think=False)]
    else:
        texts = [o.text for o in llm.generate([p.prompt for p in problems], [greedy] * len(problems))]
    out = []
    for length, depth, start, count in cells:
        hits = sum(tasks[i].verify(problems[i], texts[i]) for i in range(start, start + count))
        out.append({"length": length, "depth": depth, "n": count, "accuracy": hits / count})
    return out


def main(argv: list[str] | None = None) -> int:
    from dsv3.inference import LLM

    parser = argparse.ArgumentParser(prog="python -m dsv3.tasks.passkey", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run directory or HF model directory")
    parser.add_argument("--lengths", default="256,1024", help="prompt lengths in tokens, comma separated")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    parser.add_argument("--n", type=int, default=10, help="held-out keys per cell")
    parser.add_argument("--chat", action="store_true", help="ask through the chat template")
    args = parser.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        depths = [float(x) for x in args.depths.split(",")]
        llm = LLM(args.checkpoint, max_seq_len=max(lengths) + 16, max_batch_size=16)
        for rec in passkey_sweep(llm, lengths, depths, n=args.n, chat=args.chat):
            print(json.dumps(rec), flush=True)
    except ValueError as e:
        print(f"passkey: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
