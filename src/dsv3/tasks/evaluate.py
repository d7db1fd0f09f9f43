"""`dsv3 eval`: greedy pass@1 and sampled pass@k of a model on a task's held-out split.

    dsv3 eval --checkpoint runs/add-sft --task add:digits=3 --samples 8 --temperature 0.7 --limit 200

prints one JSON line: greedy_pass@1, pass@1 and pass@K from K samples per problem, mean reward, the
fraction of well-formed greedy answers and mean response lengths in tokens. Every prompt of the split
(greedy and sampled) goes through the engine in one batched run.

`--tasks hellaswag,arc_easy` runs lm-evaluation-harness tasks in the same process on the same engine,
alone or with `--task` (dsv3.tasks.harness_eval; `--include-path`, `--num-fewshot`, `--output FILE`).

pass@k is the unbiased estimator of the Codex paper (Chen et al., 2021): with n samples of which c are
correct, pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems; computed as a product,
1 - prod_{i=n-c+1..n} (1 - k/i), which stays exact where the binomials would overflow.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.inference import LLM
from dsv3.tasks.base import Problem, Task
from dsv3.tasks.prompts import Generator, Sample, sample_responses, sampling_plan
from dsv3.tasks.registry import get_task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


@dataclass
class EvalConfig:
    """limit: held-out problems; samples: K sampled responses per problem (0 = greedy only)."""

    limit: int = 100
    samples: int = 8
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    think: bool = True  # False: prompts without the think opening (models tuned on bare answers)

    def validate(self) -> EvalConfig:
        if self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0 (0 = greedy only), got {self.samples}")
        if self.samples and self.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature}")
        sampling_plan(1, 1, self.temperature or 1.0, self.max_new_tokens, self.top_p, self.seed)
        return self


def evaluate_task(llm: Generator, task: Task, config: EvalConfig | None = None) -> dict[str, Any]:
    """Score `llm` on the first `limit` problems of the task's held-out split; the metrics dict."""
    cfg = (config or EvalConfig()).validate()
    problems = task.split("test", cfg.limit)
    K = cfg.samples
    plan = sampling_plan(
        len(problems), K, cfg.temperature, cfg.max_new_tokens, cfg.top_p, cfg.seed, greedy=True
    )
    results = sample_responses(llm, problems, plan, think=cfg.think)
    return score(task, problems, results, K, cfg.temperature)


def score(
    task: Task, problems: list[Problem], results: list[list[Sample]], samples: int, temperature: float
) -> dict[str, Any]:
    """Metrics from [problem][greedy, sample 1..K] responses."""
    n, K = len(problems), samples
    greedy = [r[0] for r in results]
    out: dict[str, Any] = {
        "task": task.name,
        "split": "test",
        "problems": n,
        "greedy_pass@1": sum(task.verify(p, s.text) for p, s in zip(problems, greedy)) / n,
        "well_formed": sum(task.well_formed(s.text) for s in greedy) / n,
        "mean_response_tokens": sum(s.num_tokens for s in greedy) / n,
        "samples": K,
    }
    if K:
        sampled = [r[1:] for r in results]
        correct = [sum(task.verify(p, s.text) for s in r) for p, r in zip(problems, sampled)]
        out["temperature"] = temperature
        out["pass@1"] = sum(pass_at_k(K, c, 1) for c in correct) / n
        out[f"pass@{K}"] = sum(pass_at_k(K, c, K) for c in correct) / n
        rewards = [task.reward(p, s.text) for p, r in zip(problems, sampled) for s in r]
        out["mean_reward"] = sum(rewards) / len(rewards)
        out["sampled_mean_response_tokens"] = sum(s.num_tokens for r in sampled for s in r) / (n * K)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    parser.add_argument("--checkpoint", required=True, help="run directory or HF model directory")
    parser.add_argument("--task", default=None, help="add, add:digits=5, countdown, or module:function")
    parser.add_argument(
        "--tasks", default=None, help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy)"
    )
    parser.add_argument("--include-path", default=None, help="directory of your own lm_eval YAML tasks")
    parser.add_argument("--num-fewshot", type=int, default=None, help="lm_eval few-shot examples per prompt")
    parser.add_argument(
        "--apply-chat-template", action="store_true", help="lm_eval prompts through the chat template"
    )
    parser.add_argument("--output", default=None, help="write the results (and lm_eval samples) as JSON")
    parser.add_argument("--samples", type=int, default=d.samples, help="K samples per problem (0 = greedy)")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument(
        "--limit", type=int, default=None, help=f"problems / lm_eval documents per task (--task: {d.limit})"
    )
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--no-think", action="store_true", help="prompt without the <think> opening (answer directly)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-batch-size", "--batch-size", dest="max_batch_size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    if args.task is None and args.tasks is None:
        raise ValueError("give --task SPEC (a verifiable task), --tasks LIST (lm_eval tasks), or both")
    task, cfg, harness, tm = None, None, None, None
    if args.task is not None:
        task = get_task(args.task)
        cfg = EvalConfig(
            limit=args.limit if args.limit is not None else EvalConfig.limit,
            samples=args.samples,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            think=not args.no_think,
        ).validate()
    if args.tasks is not None:  # checked (task names included) before the model loads
        from dsv3.tasks.harness_eval import HarnessConfig, task_manager

        harness = HarnessConfig(
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
            include_path=args.include_path,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.max_batch_size,
            apply_chat_template=args.apply_chat_template,
        ).validate()
        tm = task_manager(harness)
    llm = LLM(
        args.checkpoint, dtype=args.dtype, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len
    )
    report: dict[str, Any] = {"checkpoint": str(args.checkpoint)}
    if task is not None:
        metrics = evaluate_task(llm, task, cfg)
        print(json.dumps({"checkpoint": str(args.checkpoint), "task_spec": args.task, **metrics}), flush=True)
        report["task"] = {"task_spec": args.task, **metrics}
    results = None
    if harness is not None:
        from dsv3.tasks.harness_eval import run_harness, summary, table

        results = run_harness(llm, harness, tm)
        print(table(results), flush=True)
        report["tasks"] = summary(results)
        print(json.dumps({"checkpoint": str(args.checkpoint), "tasks": report["tasks"]}), flush=True)
    if args.output:
        from dsv3.tasks.harness_eval import write_results

        if results is not None:
            write_results(args.output, results, report)
        else:
            Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0
