"""Verifiable tasks (`add`, `countdown`, your own): prompt generators with a fixed held-out split, verifiers
and rewards, SFT records, and the `dsv3 eval` / `dsv3 distill` drivers over dsv3's engine.

    from dsv3.tasks import get_task
    task = get_task("add:digits=3")
    test = task.split("test", 100)                       # the held-out problems, the same everywhere
    task.reward(test[0], "<think>...</think>825")         # 1.0 correct / 0.1 well formed / 0.0
    records = task.sft_records(1000, reasoning=True)      # {"messages": [...]} for `dsv3 sft`
"""

from dsv3.tasks.add import AddTask
from dsv3.tasks.base import Problem, Task, format_response, split_response
from dsv3.tasks.countdown import CountdownTask, Equation, parse_equation, solve
from dsv3.tasks.distill import (
    DistillConfig,
    DistillResult,
    acceptor,
    load_prompts,
    rejection_sample,
    write_jsonl,
)
from dsv3.tasks.evaluate import EvalConfig, evaluate_task, pass_at_k
from dsv3.tasks.registry import TaskRegistry, get_task, load_function, load_reward

__all__ = [
    "AddTask",
    "CountdownTask",
    "DistillConfig",
    "DistillResult",
    "EvalConfig",
    "Equation",
    "Problem",
    "Task",
    "TaskRegistry",
    "acceptor",
    "evaluate_task",
    "format_response",
    "get_task",
    "load_function",
    "load_prompts",
    "load_reward",
    "parse_equation",
    "pass_at_k",
    "rejection_sample",
    "solve",
    "split_response",
    "write_jsonl",
]
