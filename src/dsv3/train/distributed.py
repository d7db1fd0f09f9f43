"""Starting a training run: the layout check, `--nproc N`, the plan of this process, the wired trainer.

- `dsv3 train --nproc N ...` (no torchrun environment): `maybe_spawn` checks the configs and the layout
  for N ranks, then starts N local ranks (dsv3.parallel.launch: torchrun's environment, a watchdog that
  stops the survivors when one rank fails) which each run the same `dsv3 train` arguments.
- `make_plan`: under torchrun (or as such a rank) it initialises the process group (gloo on CPU, NCCL on
  GPU, with a timeout), starts the rank's watchdog (heartbeat: a frozen peer ends the job within
  `rank_timeout_s`, naming it; the launcher's death stops this rank), builds the mesh from
  `TrainConfig.parallel` and returns an `ExpertDataPlan` (pp = 1) or a `PipelinePlan`; in a plain
  process, a `SinglePlan`.
- `make_trainer`: plan, run directory, data, checkpointer and `Trainer`, resumed when asked.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dsv3 import io as dio
from dsv3.config import ModelConfig, ParallelConfig, TrainConfig
from dsv3.parallel import Mesh, build_mesh, env_from_environ, init_distributed
from dsv3.parallel.launch import RankWatchdog, shutdown_distributed, spawn_call
from dsv3.train.checkpoint import Checkpointer
from dsv3.train.pipeline import PipelinePlan, pipeline_schedule
from dsv3.train.plans import ExpertDataPlan, ParallelPlan, SinglePlan
from dsv3.train.setup import TrainData, load_train_data, prepare_run_dir
from dsv3.train.trainer import Trainer


def check_layout(train_cfg: TrainConfig, world: int, model_cfg: ModelConfig | None = None) -> ParallelConfig:
    """The run's layout on `world` ranks (dp derived), every constraint checked: ValueError naming the
    field, before any rank starts."""
    if train_cfg.parallel.pp > 1:  # the schedule's own constraints (e.g. DualPipe's micro-batches)
        pipeline_schedule(train_cfg.parallel, train_cfg.parallel.pp)
    return train_cfg.layout(world, model_cfg)


def with_fp8(train_cfg: TrainConfig, fp8: bool) -> TrainConfig:
    """`--fp8`: the train config with its one FP8 switch (`parallel.fp8`) on, validated."""
    if not fp8:
        return train_cfg
    return train_cfg.replace(parallel=dataclasses.replace(train_cfg.parallel, fp8=True))


def maybe_spawn(
    args: argparse.Namespace,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    target: str = "dsv3.train.cli:run",
) -> int | None:
    """`--nproc N` outside torchrun: start N ranks running `target` (module:function) on these arguments;
    None = run here."""
    nproc = getattr(args, "nproc", 1) or 1
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    env = env_from_environ()
    if env is not None:
        if nproc > 1 and env.world_size != nproc:
            raise ValueError(f"--nproc {nproc} under torchrun with WORLD_SIZE={env.world_size}: drop --nproc")
        return None
    check_layout(train_cfg, nproc, model_cfg)  # a bad layout fails here, before any rank starts
    if nproc == 1:
        return None
    payload = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "nproc"}, nproc=nproc)
    return spawn_call(target, payload, nproc)


def make_plan(train_cfg: TrainConfig, model_cfg: ModelConfig, rank_timeout_s: float = 30.0) -> ParallelPlan:
    """The plan of this process: from the torchrun environment if there is one, else a single process.
    rank_timeout_s: a peer rank silent that long (frozen, stopped) ends the job with an error naming it."""
    env = env_from_environ()
    world = 1 if env is None else env.world_size
    pc = check_layout(train_cfg, world, model_cfg)
    if world == 1:
        return SinglePlan(Mesh.single(pc))
    if rank_timeout_s <= 0:
        raise ValueError(f"--rank-timeout must be > 0 seconds, got {rank_timeout_s}")
    if init_distributed(timeout_s=pc.timeout_s, backend=pc.backend) is not None:
        atexit.register(shutdown_distributed)  # torchrun ranks: leave the process group cleanly at exit
        atexit.register(RankWatchdog(env, timeout_s=rank_timeout_s).start().stop)  # runs first (LIFO)
    device = f"cuda:{env.local_rank}" if dist.get_backend() == "nccl" else "cpu"
    mesh = build_mesh(pc)
    return PipelinePlan(mesh, device) if pc.pp > 1 else ExpertDataPlan(mesh, device)


def make_trainer(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    plan: ParallelPlan | None = None,
    train_data: TrainData | None = None,
    rank_timeout_s: float = 30.0,
) -> Trainer:
    """A trainer for this process (collective under several ranks): the run directory checked, the data
    and tokenizer loaded, RUN_DIR/train_config.json written, the newest good checkpoint loaded on resume."""
    model_cfg = model_cfg.validate()
    train_cfg = train_cfg.validate(model_cfg)  # seq_len within the model's positions
    plan = plan or make_plan(train_cfg, model_cfg, rank_timeout_s)
    run_dir = Path(run_dir)

    def log(msg: str) -> None:
        if plan.is_main:
            print(msg, flush=True)

    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, is_main=plan.is_main, barrier=plan.barrier)
    if train_data is None:  # pre-training text (SFT passes its packed samples)
        train_data = load_train_data(
            run_dir, data, model_cfg, train_cfg, is_main=plan.is_main, barrier=plan.barrier, log=log
        )
    checkpointer = Checkpointer(run_dir / "checkpoints", train_cfg.keep_checkpoints, plan.mesh, warn=log)
    trainer = Trainer(
        model_cfg,
        train_cfg,
        run_dir,
        plan=plan,
        data=train_data,
        checkpointer=checkpointer,
        progress=progress,
    )
    if plan.is_main:
        info: dict[str, Any] = trainer.run_info(data)
        dio.atomic_write(run_dir / "train_config.json", (json.dumps(info, indent=2) + "\n").encode())
    if resume:
        trainer.load_checkpoint()
    return trainer
