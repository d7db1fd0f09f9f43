"""`dsv3 eval --tasks LIST`: lm-evaluation-harness tasks, in process, on dsv3's engine.

    dsv3 eval --checkpoint runs/tiny --tasks hellaswag,arc_easy --limit 200 --output results.json
    dsv3 eval --checkpoint runs/tiny --tasks my_task --include-path my_tasks/ --num-fewshot 5

Task names are checked against lm_eval's task index (its built-in tasks plus `--include-path`) before
any model is loaded. lm_eval is an optional dependency (`pip install dsv3[eval]`), imported only here
and in `dsv3.tasks.harness`, so `import dsv3` never needs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3.inference import LLM


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:  # the optional third-party package, not one of dsv3's modules
        raise ValueError("--tasks needs lm-evaluation-harness: pip install 'dsv3[eval]' (or lm-eval)") from e


@dataclass
class HarnessConfig:
    """tasks: lm_eval task/group names; limit: documents per task (None = all); num_fewshot: None = the
    task's own; apply_chat_template: render prompts with the model's chat template."""

    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    seed: int = 1234
    apply_chat_template: bool = False
    bootstrap_iters: int = 0  # stderr by bootstrap: off by default (slow on many metrics)

    def validate(self) -> HarnessConfig:
        if not self.tasks or any(not t.strip() for t in self.tasks):
            raise ValueError(f"--tasks needs a comma-separated list of task names, got {self.tasks!r}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise ValueError(f"--include-path {self.include_path} is not a directory")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.bootstrap_iters < 0:
            raise ValueError(f"bootstrap_iters must be >= 0, got {self.bootstrap_iters}")
        return self


def parse_tasks(spec: str) -> list[str]:
    return [t.strip() for t in spec.split(",") if t.strip()]


def task_manager(cfg: HarnessConfig) -> Any:
    """lm_eval's TaskManager over its built-in tasks and cfg.include_path; unknown names raise ValueError
    naming the places searched (nothing is loaded or downloaded here)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=cfg.include_path)
    unknown = [t for t in cfg.tasks if t not in tm.all_tasks and not Path(t).is_file()]
    if unknown:
        import lm_eval.tasks

        where = [str(Path(lm_eval.tasks.__file__).parent)] + ([cfg.include_path] if cfg.include_path else [])
        raise ValueError(
            f"unknown lm_eval task(s) {unknown}: looked in {', '.join(where)} "
            f"({len(tm.all_tasks)} tasks, groups and tags; `lm_eval ls tasks` lists them; "
            "your own YAML tasks need --include-path DIR)"
        )
    return tm


def run_harness(llm: LLM, cfg: HarnessConfig, tm: Any | None = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate on `llm` through DSV3LM; lm_eval's results dict (samples included)."""
    cfg.validate()
    tm = tm if tm is not None else task_manager(cfg)
    from lm_eval import simple_evaluate

    from dsv3.tasks.harness import DSV3LM

    lm = DSV3LM(llm, batch_size=cfg.batch_size, seed=cfg.seed)
    out = simple_evaluate(
        model=lm,
        tasks=cfg.tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=tm,
        bootstrap_iters=cfg.bootstrap_iters,
        apply_chat_template=cfg.apply_chat_template,
        log_samples=True,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    if out is None:
        raise ValueError("lm_eval returned no results")
    return out


def summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric,filter: value}}: the numbers of lm_eval's results table, JSON-safe."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "alias"}
    return out


def table(results: dict[str, Any]) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def write_results(path: str | Path, results: dict[str, Any], extra: dict[str, Any]) -> None:
    """The JSON results file: lm_eval's results, configs and per-document samples, plus `extra`."""
    from lm_eval.utils import handle_non_serializable

    keep = ("results", "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "samples")
    body = {**extra, "lm_eval": {k: results[k] for k in keep if k in results}}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(body, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
