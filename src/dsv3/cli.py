"""The `dsv3` command: each subcommand is a module with `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from dsv3.runtime import tune_malloc

# name -> (module, one-line help). Modules are imported only when their subcommand runs (or for --help).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dsv3.train.cli", "train a model (single process, --nproc N, or under torchrun)"),
    "sft": ("dsv3.train.sft_cli", "supervised fine-tuning on chat data, packed with sample masking"),
    "generate": ("dsv3.inference.cli", "generate text from a run directory or an HF checkpoint"),
    "serve": ("dsv3.serving.cli", "OpenAI-compatible HTTP server over the inference engine"),
    "convert": ("dsv3.checkpoint.cli", "convert checkpoints (HF <-> native, BF16 <-> FP8)"),
    "plan": ("dsv3.plan.cli", "analytic cost model; `dsv3 plan pipeline` simulates pipeline schedules"),
    "plot": ("dsv3.train.plot", "plot a run's loss curves and expert-load heatmap; GRPO reward curves"),
    "eval": ("dsv3.tasks.evaluate", "greedy pass@1 and sampled pass@k on a task's held-out split"),
    "distill": ("dsv3.tasks.distill", "distillation data by rejection sampling from a teacher"),
    "rm": ("dsv3.rl.rm_cli", "train a reward model on preference pairs (Bradley-Terry, pairwise accuracy)"),
    "grpo": ("dsv3.rl.cli", "reinforcement learning with GRPO (task verifiers, reward functions)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3", description="DeepSeek-V3 from scratch: train, generate, serve, plan."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
        if name == "plan":
            _add_plan_pipeline(p)
    return parser


def _add_plan_pipeline(plan: argparse.ArgumentParser) -> None:
    """`dsv3 plan pipeline ARGS...`: the pipeline schedule simulator (dsv3.parallel.pipeline.cli). Its
    arguments pass through untouched (a prefix char no argument starts with keeps argparse from reading
    them as options of `plan`) and are parsed by the simulator's own parser."""
    sub = plan.add_subparsers(dest="plan_command", metavar="{pipeline}")
    p = sub.add_parser(
        "pipeline",
        help="simulate pipeline schedules (`dsv3 plan pipeline --help`)",
        add_help=False,
        prefix_chars="\x01",
    )
    p.add_argument("pipeline_args", nargs="*")

    def run(args: argparse.Namespace) -> int:
        from dsv3.parallel.pipeline import cli as pipeline_cli

        parser = argparse.ArgumentParser(prog="dsv3 plan pipeline", description="simulate pipeline schedules")
        pipeline_cli.add_arguments(parser)
        return int(pipeline_cli.run(parser.parse_args(args.pipeline_args)) or 0)

    p.set_defaults(_run=run)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    tune_malloc()  # warm-page reuse for multi-MiB CPU tensors (dsv3.runtime); no numbers change
    try:
        return int(args._run(args) or 0)
    except ValueError as e:  # bad input: a clear message, no traceback
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
