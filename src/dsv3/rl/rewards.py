"""Reward functions for GRPO: task verifiers, user functions, reward models; several with weights.

A reward spec (`--reward SPEC`, repeatable) is one of
- `task`                   the verifier of the run's own `--task` (the default with --task);
- `NAME[:k=v,...]`, `task:NAME[:k=v,...]`   a registered task's verifier (`add`, `add:digits=2`); with a
                           prompts file it checks the record's columns (`add`: a and b);
- `rm:RUN_DIR`             a reward model trained by `dsv3 rm` (dsv3.rl.reward_model);
- `module:function`        a user function,
followed by an optional weight `@W` (`--reward add --reward mypkg.rewards:brevity@0.5`; default 1).

Every reward function is called once per rollout batch, as TRL calls them:

    f(prompts, completions, completion_ids, **columns) -> list[float | None]

prompts (the records' prompt: a string or a list of messages), completions (the response text, with the
chat template's response opening such as `<think>\\n` put back), completion_ids (generated token ids)
and each dataset column by name (`answer`, and for a task `problem`: the dsv3.tasks.Problem), all lists
of the batch's length. A function returns one number per completion, or None where it does not apply:
None becomes NaN and the weighted rewards are summed with nansum (a completion no function scores gets
advantage 0). A list of another length, a non-number or a non-finite number is an error naming the
function, never broadcast.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsv3.tasks import Problem, Task, get_task, load_function
from dsv3.tasks.registry import TaskRegistry

RewardFunc = Callable[..., Sequence[Any]]


@dataclass
class Reward:
    """One named, weighted reward function."""

    name: str
    fn: RewardFunc
    weight: float = 1.0


def task_reward(task: Task) -> RewardFunc:
    """The task's verifier as a reward function: 1.0 correct, 0.1 well formed, 0.0 otherwise. It reads
    the `problem` column (task prompts), or builds the problem from a prompts file's columns (`add`
    checks columns a and b; `countdown` numbers and target)."""

    def reward(
        prompts: list[Any], completions: list[str], completion_ids: list[list[int]], **columns: Any
    ) -> list[float | None]:
        problems = columns.get("problem")
        if problems is None:  # a prompts file: the record's columns are the problem's data
            answers = columns.get("answer", [None] * len(prompts))
            problems = [
                Problem(
                    task.name,
                    str(i),
                    p if isinstance(p, str) else "",
                    None if a is None else str(a),
                    data={k: v[i] for k, v in columns.items()},
                )
                for i, (p, a) in enumerate(zip(prompts, answers))
            ]
        try:
            return [task.reward(p, c) for p, c in zip(problems, completions)]
        except KeyError as e:
            raise ValueError(
                f"the {task.name} verifier needs the column {e.args[0]!r} in every prompts record"
            ) from None

    return reward


def _split_weight(spec: str) -> tuple[str, float]:
    body, at, w = spec.rpartition("@")
    if not at:
        return spec, 1.0
    try:
        weight = float(w)
    except ValueError:
        raise ValueError(f"reward {spec!r}: the weight after '@' must be a number, got {w!r}") from None
    if not math.isfinite(weight):
        raise ValueError(f"reward {spec!r}: the weight must be finite, got {weight}")
    return body, weight


def load_reward_model_fn(run_dir: str) -> RewardFunc:
    """`rm:RUN_DIR`: the scorer of a `dsv3 rm` run (dsv3.rl.reward_model, imported on first use)."""
    from dsv3.rl.reward_model import load_reward_model

    return load_reward_model(run_dir)


def parse_reward(spec: str, task: Task | None = None, registry: TaskRegistry | None = None) -> Reward:
    """A `Reward` from a spec (module docstring); `task` is what the bare spec `task` refers to."""
    body, weight = _split_weight(spec.strip())
    if not body:
        raise ValueError(f"empty reward spec {spec!r}")
    registry = registry or TaskRegistry.builtin()
    head, _, rest = body.partition(":")
    if body == "task":
        if task is None:
            raise ValueError("reward 'task' refers to the run's --task, but prompts come from a file")
        return Reward(f"task:{task.name}", task_reward(task), weight)
    if head == "task":
        return Reward(body, task_reward(get_task(rest, registry)), weight)
    if head == "rm":
        if not rest:
            raise ValueError("reward rm:RUN_DIR needs the reward model's run directory")
        return Reward(body, load_reward_model_fn(rest), weight)
    if head in registry.factories:
        return Reward(body, task_reward(get_task(body, registry)), weight)
    return Reward(body, load_function(body, "reward function"), weight)


def parse_rewards(specs: Sequence[str], task: Task | None = None) -> list[Reward]:
    """Rewards from specs; no spec means the task's verifier (an error without a task)."""
    if not specs:
        if task is None:
            raise ValueError("give at least one --reward with a prompts file (e.g. --reward add or mod:fn)")
        specs = ["task"]
    rewards = [parse_reward(s, task) for s in specs]
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"a reward function is given twice: {names}")
    return rewards


def _check(name: str, values: Any, n: int) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, list | tuple):
        raise ValueError(f"reward function {name!r} returned {type(values).__name__}, expected a list of {n}")
    if len(values) != n:
        raise ValueError(f"reward function {name!r} returned {len(values)} rewards for {n} completions")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(
                f"reward function {name!r}: reward {i} is {v!r} ({type(v).__name__}), not a number or None"
            )
        if not math.isfinite(float(v)):
            raise ValueError(f"reward function {name!r}: reward {i} is {v}, not finite (use None to skip)")
        out.append(float(v))
    return out


def compute_rewards(
    rewards: Sequence[Reward],
    prompts: list[Any],
    completions: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-function rewards [N, F] float64 with NaN where a function returned None, weighted total [N]:
    nansum over functions, NaN where no function applied)."""
    n = len(completions)
    if len(prompts) != n or len(completion_ids) != n:
        raise ValueError(f"{len(prompts)} prompts, {n} completions, {len(completion_ids)} id lists")
    for k, col in columns.items():
        if len(col) != n:
            raise ValueError(f"column {k!r} has {len(col)} values for {n} completions")
    per_func = torch.tensor(
        [_check(r.name, r.fn(prompts, completions, completion_ids, **columns), n) for r in rewards],
        dtype=torch.float64,
    ).T.reshape(n, len(rewards))
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float64)
    total = (per_func * weights).nansum(dim=1)
    total[torch.isnan(per_func).all(dim=1)] = math.nan
    return per_func, total
