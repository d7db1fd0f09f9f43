"""Finding tasks and reward functions by name.

A task spec is `NAME` or `NAME:key=value,key=value` for a registered task (`add:digits=5`,
`countdown:max_numbers=3`), or `module:function` naming a callable that returns a Task (a user's own task,
no registration needed). A `TaskRegistry` is an object, not a module global: `TaskRegistry.builtin()` holds
`add` and `countdown`, and `register(name, factory)` adds a user's task to a registry the caller owns.

A reward function spec is `module:function`; the function is called as `fn(problem, response) -> float`
with a `dsv3.tasks.Problem` (for a prompts file: `prompt`, `answer` and the whole record in `data`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsv3.tasks.add import AddTask
from dsv3.tasks.base import Problem, Task
from dsv3.tasks.countdown import CountdownTask
from dsv3.tasks.passkey import PasskeyTask

RewardFn = Callable[[Problem, str], float]
TaskFactory = Callable[..., Task]
_NAME = re.compile(r"[A-Za-z_][\w-]*")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def load_function(spec: str, what: str = "function") -> Callable[..., Any]:
    """`package.module:function` -> the callable; ValueError saying what is wrong otherwise."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not _DOTTED.fullmatch(mod_name) or not _DOTTED.fullmatch(fn_name):
        raise ValueError(f"{what} must be given as module:function (e.g. mypkg.rewards:exact), got {spec!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"{what} {spec!r}: cannot import module {mod_name!r} ({e})") from e
    obj: Any = mod
    for part in fn_name.split("."):
        if part not in vars(obj):
            raise ValueError(f"{what} {spec!r}: {mod_name!r} has no attribute {fn_name!r}")
        obj = vars(obj)[part]
    if not callable(obj):
        raise ValueError(f"{what} {spec!r}: {fn_name!r} is not callable")
    return obj


def load_reward(spec: str) -> RewardFn:
    """A reward function `fn(problem, response) -> float` from `module:function`."""
    return load_function(spec, "reward function")


def _value(text: str) -> Any:
    """A spec value: int, float, true/false, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass
class TaskRegistry:
    """name -> factory(**settings) returning a Task."""

    factories: dict[str, TaskFactory] = field(default_factory=dict)

    @classmethod
    def builtin(cls) -> TaskRegistry:
        return cls({"add": AddTask, "countdown": CountdownTask, "passkey": PasskeyTask})

    def register(self, name: str, factory: TaskFactory, overwrite: bool = False) -> TaskRegistry:
        if not _NAME.fullmatch(name):
            raise ValueError(f"task name must be an identifier (letters, digits, _ or -), got {name!r}")
        if name in self.factories and not overwrite:
            raise ValueError(f"task {name!r} is already registered (pass overwrite=True to replace it)")
        if not callable(factory):
            raise ValueError(f"task {name!r}: factory must be callable, got {type(factory).__name__}")
        self.factories[name] = factory
        return self

    @property
    def names(self) -> list[str]:
        return sorted(self.factories)

    def get(self, spec: str) -> Task:
        """A task from `NAME[:key=value,...]` or `module:function`."""
        name, _, rest = spec.partition(":")
        if name in self.factories:
            settings: dict[str, Any] = {}
            for item in filter(None, rest.split(",")):
                key, eq, val = item.partition("=")
                if not eq or not key.strip():
                    raise ValueError(f"task {spec!r}: settings are key=value pairs, got {item!r}")
                settings[key.strip()] = _value(val.strip())
            try:
                task = self.factories[name](**settings)
            except TypeError as e:
                raise ValueError(f"task {spec!r}: bad settings ({e})") from e
        elif rest and "=" not in rest:
            task = load_function(spec, "task factory")()
        else:
            raise ValueError(
                f"unknown task {name!r}: registered tasks are {self.names}, or give module:function"
            )
        if not isinstance(task, Task):
            raise ValueError(f"task {spec!r} did not produce a dsv3.tasks.Task (got {type(task).__name__})")
        return task


def get_task(spec: str | Task, registry: TaskRegistry | None = None) -> Task:
    """`get_task("add:digits=3")`: a Task from a spec (a Task passes through), built-ins by default."""
    if isinstance(spec, Task):
        return spec
    return (registry or TaskRegistry.builtin()).get(spec)
