"""`dsv3 grpo`: reinforcement learning with GRPO from a trained (usually SFT) model (dsv3.rl.grpo).

    dsv3 grpo --from RUN (--task NAME | --prompts FILE) [--reward SPEC[@W] ...] --out RUN [--steps N]
              [--stop-at K] [--resume] [--overwrite] [--no-think] [--nproc N] [key=value ...]

--task draws prompts from a task's train split (`add:digits=2`; the held-out split is never used), and its
verifier is the default reward. --prompts FILE is JSONL with "prompt" (a string or a list of messages) and
any extra columns, passed to the reward functions by name. --reward (repeatable) is `task`, a task name
(`add:digits=2`), `rm:RUN_DIR` (a `dsv3 rm` reward model) or `module:function`, with an optional weight
`@W` (dsv3.rl.rewards). key=value sets GRPOConfig fields: num_generations=8 prompts_per_step=8 lr=1e-6
beta=0.0 epsilon=0.2 epsilon_high=0.28 loss_type=dapo|grpo|dr_grpo scale_rewards=group|batch|none
num_iterations=1 temperature=1.0 top_p=1.0 max_completion_length=256 mask_truncated_completions=false
mtp_weight=0 (train MTP on rollouts) micro_batch=0 dtype=float32 checkpoint_every=50 sample_every=10
eval_every=0 eval_samples=100 (held-out greedy accuracy of a --task run, "eval" records).

Data parallelism: `--nproc N` starts N local ranks (gloo on CPU, NCCL with GPUs), and the same command
runs under `torchrun --nproc-per-node N -m dsv3.cli grpo ...`; prompts_per_step x num_generations must
be a multiple of N. N ranks take the single-process steps (dsv3.rl.ranks); a run resumes on any N.

Writes RUN/metrics.jsonl (type "grpo" per step, "sample" and "eval" records; `dsv3 plot RUN` draws the
reward curves), RUN/checkpoints/ (exact resume) and RUN/model (HF format, for `dsv3 eval` / `dsv3 generate`).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json

import torch
import torch.distributed as dist

from dsv3.config import coerce_value
from dsv3.parallel import env_from_environ, init_distributed
from dsv3.parallel.launch import RankWatchdog, shutdown_distributed, spawn_call
from dsv3.rl.config import GRPOConfig
from dsv3.rl.grpo import GRPO, load_policy
from dsv3.rl.prompts import PromptSource
from dsv3.rl.ranks import Ranks, shard_rows
from dsv3.rl.rewards import parse_rewards
from dsv3.tasks import get_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="src", required=True, help="run directory or HF model directory")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="task spec for prompts: add, add:digits=2, countdown, or module:function")
    src.add_argument("--prompts", help='JSONL of {"prompt": str | messages, ...columns}')
    parser.add_argument(
        "--reward",
        action="append",
        default=[],
        help="SPEC[@WEIGHT], repeatable (default: the task's verifier)",
    )
    parser.add_argument("--out", required=True, help="run directory for the RL-tuned model")
    parser.add_argument("--steps", type=int, default=None, help="rollout steps (default 100)")
    parser.add_argument("--stop-at", type=int, default=None, help="end after step K with a checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over in a run directory")
    parser.add_argument("--no-think", action="store_true", help="prompts without the <think> opening")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--nproc", type=int, default=1, help="local data-parallel ranks")
    parser.add_argument("--rank-timeout", type=float, default=60.0, help="seconds before a silent rank fails")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="GRPOConfig settings")


def grpo_config(pairs: list[str], **given: object) -> GRPOConfig:
    """GRPOConfig from key=value strings (typed as each field's default) and explicit settings."""
    base = GRPOConfig()
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    kw: dict[str, object] = {k: v for k, v in given.items() if v is not None}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"unknown setting {pair!r}: GRPO settings are {sorted(fields)}")
        current = base.to_dict()[key]
        if key == "epsilon_high":
            current = 0.0  # a float (None by default: = epsilon)
        kw[key] = coerce_value(current, text, key)
    return dataclasses.replace(base, **kw).validate()


def data_parallel_ranks(rank_timeout_s: float = 60.0) -> Ranks:
    """Under torchrun (or as a `--nproc` rank): the process group initialised (gloo on CPU, NCCL on GPU)
    with a watchdog that ends the job when a peer freezes; a plain process: `Ranks()`."""
    env = init_distributed()
    if env is None:
        return Ranks()
    if rank_timeout_s <= 0:
        raise ValueError(f"--rank-timeout must be > 0 seconds, got {rank_timeout_s}")
    atexit.register(shutdown_distributed)
    atexit.register(RankWatchdog(env, timeout_s=rank_timeout_s).start().stop)  # runs first (LIFO)
    gpu = dist.get_backend() == "nccl"
    device = torch.device(f"cuda:{env.local_rank}" if gpu else "cpu")
    return Ranks(dist.group.WORLD, device)


def run(args: argparse.Namespace) -> int:
    cfg = grpo_config(args.overrides, steps=args.steps, think=False if args.no_think else None)
    if args.stop_at is not None and not 0 < args.stop_at <= cfg.steps:
        raise ValueError(f"--stop-at must be in [1, steps={cfg.steps}], got {args.stop_at}")
    nproc = args.nproc
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    env = env_from_environ()
    if env is not None and nproc > 1 and env.world_size != nproc:
        raise ValueError(f"--nproc {nproc} under torchrun with WORLD_SIZE={env.world_size}: drop --nproc")
    shard_rows(cfg.prompts_per_step * cfg.num_generations, 0, env.world_size if env else nproc)
    task = get_task(args.task) if args.task else None
    rewards = parse_rewards(args.reward, task)
    if env is None and nproc > 1:  # checked above, before any rank starts
        return spawn_call("dsv3.rl.cli:run", args, nproc)
    ranks = data_parallel_ranks(args.rank_timeout)
    policy, tokenizer, model_dir = load_policy(args.src)
    policy = policy.to(ranks.device)
    prompts = PromptSource(tokenizer, task=task, path=args.prompts, think=cfg.think, seed=cfg.seed)
    say = print if ranks.is_main else _quiet
    say(
        f"grpo: {model_dir} on {args.task or args.prompts}; rewards "
        f"{', '.join(f'{r.name}@{r.weight:g}' for r in rewards)}; {cfg.steps} steps of "
        f"{cfg.prompts_per_step} prompts x {cfg.num_generations} completions, loss {cfg.loss_type}, "
        f"beta {cfg.beta}" + (f"; {ranks.world} data-parallel ranks" if ranks.world > 1 else ""),
        flush=True,
    )
    runner = GRPO(
        policy,
        tokenizer,
        prompts,
        rewards,
        cfg,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        ranks=ranks,
    )
    last = runner.fit(stop_at=args.stop_at)
    keys = ("step", "reward", "frac_reward_zero_std", "completion_length_mean", "kl", "logprob_gap_max")
    say(json.dumps({k: last.get(k) for k in keys}), flush=True)
    return 0


def _quiet(*args: object, **kw: object) -> None:
    """print, on ranks other than 0."""
