"""Distributed training: `dsv3 train --nproc N`, torchrun, and the expert/data-parallel Trainer.

- `dsv3 train --nproc N ...` (no torchrun environment): the parent validates the configs, then starts
  N local ranks (dsv3.parallel.launch: torchrun's environment, a watchdog that stops the survivors when
  one rank fails) which each run the same `dsv3 train` arguments.
- Under torchrun (or as such a rank) `make_trainer` initialises the process group (gloo on CPU, NCCL on
  GPU, with a timeout), builds the mesh from the train config's pp/dp/ep/nodes fields and returns a
  `ParallelTrainer` (a `dsv3.train.pipeline.PipelineTrainer` when pp > 1); without that environment it
  returns the single-process `Trainer`.

ParallelTrainer overrides only the Trainer's hooks: model building (`parallelize`: expert parallel),
the optimizer (ZeRO-1 via `DataParallel`), the data-parallel reductions (expert loads, losses,
gradients: FP32, expert gradients only across their replicas, global norm), checkpoints (each rank
writes its shard; the step directory appears only when all are on disk) and the HF export (experts
gathered to rank 0). Data rows are split by rank (Trainer's rank::world). Only rank 0 logs and writes
metrics. Evaluation and sampling run on every rank (expert parallelism needs every rank in each
forward) on the same inputs, so all ranks agree.
"""

from __future__ import annotations

import argparse
import atexit
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dsv3.config import ModelConfig, TrainConfig
from dsv3.model import Transformer
from dsv3.parallel import (
    DataParallel,
    Mesh,
    ParallelConfig,
    build_mesh,
    env_from_environ,
    full_state_dict,
    init_distributed,
    latest_complete,
    load_sharded,
    parallelize,
    save_sharded,
)
from dsv3.parallel.data_parallel import ShardedOptimizer
from dsv3.parallel.launch import shutdown_distributed, spawn_call
from dsv3.train import checkpoint as ckpt
from dsv3.train.trainer import Trainer


def parallel_config(
    train_cfg: TrainConfig, world: int, model_cfg: ModelConfig | None = None
) -> ParallelConfig:
    """The layout of a run of `world` ranks from the train config's pp/dp/ep/nodes fields."""
    ep, pp = train_cfg.ep, train_cfg.pp
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"invalid config: ep: must be a positive integer, got {ep!r}")
    hint = " (start the ranks with --nproc N or torchrun)" if world == 1 else ""
    if world % (ep * pp):
        what = "ep" if pp == 1 else "pp x ep"
        raise ValueError(
            f"invalid config: {what.split()[0]}: {world} rank(s) cannot hold pp={pp} x ep={ep}: "
            f"need a multiple of {what}{hint}"
        )
    dp = world // (ep * pp) if train_cfg.dp is None else train_cfg.dp
    if pp * dp * ep != world:
        raise ValueError(
            f"invalid config: dp: pp={pp} x dp={dp} x ep={ep} = {pp * dp * ep} ranks, but the run has {world}"
            + ("" if world > 1 else " (use --nproc N or torchrun)")
        )
    if pp > 1:
        from dsv3.train.pipeline import check_pipeline_config

        check_pipeline_config(train_cfg, dp, model_cfg)
    pc = ParallelConfig(
        pp=pp,
        dp=dp,
        ep=ep,
        nodes=train_cfg.nodes,
        node_limit=train_cfg.node_limit,
        fp8_dispatch=train_cfg.fp8_dispatch,
        bf16_combine=train_cfg.bf16_combine,
        zero1=train_cfg.zero1,
    )
    return pc.validate(model_cfg)


def maybe_spawn(args: argparse.Namespace, model_cfg: ModelConfig, train_cfg: TrainConfig) -> int | None:
    """`--nproc N` outside torchrun: start N ranks running these arguments; None = run here."""
    nproc = getattr(args, "nproc", 1) or 1
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    env = env_from_environ()
    if env is not None:
        if nproc > 1 and env.world_size != nproc:
            raise ValueError(f"--nproc {nproc} under torchrun with WORLD_SIZE={env.world_size}: drop --nproc")
        return None
    parallel_config(train_cfg, nproc, model_cfg)  # a bad layout fails here, before any rank starts
    if getattr(args, "fp8", False) and train_cfg.pp > 1:
        raise ValueError("--fp8 with pp > 1 is not supported yet")
    if nproc == 1:
        return None
    payload = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "nproc"}, nproc=nproc)
    return spawn_call("dsv3.train.cli:run", payload, nproc)


def make_trainer(model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: str | Path, **kw: Any) -> Trainer:
    """A `ParallelTrainer` under a distributed environment, else the single-process `Trainer`."""
    env = env_from_environ()
    if env is None or env.world_size == 1 and (train_cfg.dp or 1) * train_cfg.ep * train_cfg.pp == 1:
        parallel_config(train_cfg, 1, model_cfg)
        return Trainer(model_cfg, train_cfg, run_dir, **kw)
    pc = parallel_config(train_cfg, env.world_size, model_cfg)
    if init_distributed(timeout_s=pc.timeout_s) is not None:
        atexit.register(shutdown_distributed)  # torchrun ranks: leave the process group cleanly at exit
    device = f"cuda:{env.local_rank}" if dist.get_backend() == "nccl" else "cpu"
    if pc.pp > 1:
        from dsv3.train.pipeline import PipelineTrainer

        return PipelineTrainer(model_cfg, train_cfg, run_dir, mesh=build_mesh(pc), device=device, **kw)
    return ParallelTrainer(model_cfg, train_cfg, run_dir, mesh=build_mesh(pc), device=device, **kw)


class ParallelTrainer(Trainer):
    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, run_dir: str | Path, *,
                 mesh: Mesh, **kw: Any):  # fmt: skip
        if mesh.pp > 1 and not getattr(self, "pipeline", False):
            raise ValueError("pipeline-parallel runs use dsv3.train.pipeline.PipelineTrainer")
        self.mesh = mesh
        self.dp: DataParallel | None = None
        super().__init__(model_config, train_config, run_dir, rank=mesh.rank, world=mesh.data_size, **kw)

    def _barrier(self) -> None:
        dist.barrier(group=self.mesh.world_group)

    # ------------------------------------------------------------------ setup
    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> None:
        self._barrier()  # every rank looks at the directory before rank 0 changes it
        super()._prepare_run_dir(resume, overwrite)
        self._barrier()

    def build_tokenizer(self):  # type: ignore[no-untyped-def]
        """Rank 0 trains (or loads) the tokenizer and saves it; the others then load that file."""
        if self.rank == 0:
            tok = super().build_tokenizer()
            self._barrier()
            return tok
        self._barrier()
        return super().build_tokenizer()

    def build_model(self) -> Transformer:
        model = super().build_model()
        return parallelize(model, self.mesh.config, self.mesh)

    def build_optimizer(self):  # type: ignore[no-untyped-def]
        self.dp = DataParallel(self.model, self.mesh, super().build_optimizer())
        return ShardedOptimizer(self.dp)

    # ------------------------------------------------------------------ data-parallel hooks
    def reduce_counts(self, counts: list[torch.Tensor]) -> list[torch.Tensor]:
        if not counts:
            return counts
        t = torch.stack(counts).float().to(self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t, group=self.mesh.data_group)
        return [c.to(counts[0].device) for c in t.unbind(0)]

    def reduce_scalar(self, x: torch.Tensor) -> torch.Tensor:
        t = x.detach().to(self.device, torch.float64, copy=True)
        dist.all_reduce(t, group=self.mesh.data_group)
        return (t / self.mesh.data_size).to(x.device, x.dtype)

    def reduce_gradients(self, params: list[torch.Tensor]) -> torch.Tensor:
        assert self.dp is not None
        self.dp.reduce_gradients()
        return self.dp.grad_norm()

    # ------------------------------------------------------------------ checkpoints / export
    def save_checkpoint(self) -> Path | None:
        path = self.ckpt_dir / ckpt.step_dir_name(self.step)
        state = {"model": self.model.state_dict(), "train": self.train_state()}
        save_sharded(path, state, self.mesh, meta={"step": self.step, "format": "dsv3-sharded-v1"})
        if self.rank == 0 and self.cfg.keep_checkpoints > 0:
            import shutil

            for old in ckpt.list_checkpoints(self.ckpt_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.export_hf()
        return path

    def read_checkpoint(self) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
        path = latest_complete(self.ckpt_dir)
        if path is None:
            raise ValueError(f"--resume: no complete sharded checkpoint in {self.ckpt_dir}")
        state, _ = load_sharded(path, self.mesh)
        return path, state["model"], state["train"]

    def export_hf(self, model: Transformer | None = None) -> Path | None:
        sd = full_state_dict(self.model, self.mesh)  # collective: every rank takes part
        if self.rank != 0:
            return None
        full = Transformer(self.model_config)
        full.load_state_dict(sd)
        return super().export_hf(full)
