"""Parallel plans: what the training loop asks of the ranks, for one process and for ep x dp ranks.

A plan builds the model (the seeded single-device model, then `parallelize`) and its optimizer, runs a
step's forward and backward over this rank's rows and reduces what the ranks must agree on (losses,
expert loads, gradients, the global norm), evaluates, and hands out the whole model (HF export, sample).
The trainer (dsv3.train.trainer) holds one and never branches on the layout; the pipeline's plan is
dsv3.train.pipeline.PipelinePlan.

- `SinglePlan`: one process, no collectives.
- `ExpertDataPlan`: pp = 1, dp x ep ranks. `parallelize` shards the experts over the EP group; the
  optimizer is ZeRO-1 (`DataParallel`); losses are averaged and expert loads summed over the dp * ep
  ranks (FP32); expert gradients are reduced only across their replicas; the norm is global. Evaluation
  and sampling run on every rank on the same inputs (expert parallelism needs every rank in each
  forward); the HF export gathers the experts to rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dsv3.config import ModelConfig, TrainConfig
from dsv3.model import Transformer
from dsv3.parallel import DataParallel, Mesh, full_state_dict, parallelize
from dsv3.parallel.data_parallel import ShardedOptimizer
from dsv3.train.evaluate import evaluate
from dsv3.train.optim import grad_norm
from dsv3.train.step import LossStep, Packing, accumulate, apply_speed_paths, new_model

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]


class ParallelPlan(Protocol):
    """The trainer's view of the ranks (see the module docstring)."""

    mesh: Mesh
    device: torch.device
    is_main: bool  # logs and writes the run's files
    data_rank: int  # this rank's rows are data_rank::data_size of each global batch
    data_size: int
    batch_multiple: int  # the global batch is a multiple of this

    def barrier(self) -> None: ...

    def build_model(self, model_config: ModelConfig, cfg: TrainConfig) -> Transformer: ...

    def build_optimizer(self, model: Transformer, make: MakeOptimizer) -> Any: ...

    def forward_backward(
        self,
        loss: LossStep,
        x: torch.Tensor,
        y: torch.Tensor,
        mtp_weight: float,
        micro: int | None,
        packing: Packing = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """([total, main, mtp, balance] global means, global per-layer expert loads, global grad norm).
        packing: (positions, segment_ids) of packed samples (SFT), or ()."""
        ...

    def evaluate(
        self, model: Transformer, windows: np.ndarray, token_bytes: Any, batch_size: int,
        dtype: torch.dtype, max_batches: int | None,
    ) -> dict[str, float]: ...  # fmt: skip

    def param_counts(self, model: Transformer) -> tuple[int, int]: ...

    def gather_model(self, model: Transformer) -> Transformer | None:
        """Collective: the whole model on the rank that exports it, None elsewhere."""
        ...

    def on_full_model(self, model: Transformer, fn: Callable[[Transformer], Any]) -> Any:
        """Collective: fn over the whole model, its result on every rank."""
        ...


class SinglePlan:
    """One process: the model as built, no collectives."""

    is_main, data_rank, data_size, batch_multiple = True, 0, 1, 1

    def __init__(self, mesh: Mesh, device: str | torch.device = "cpu"):
        self.mesh, self.device = mesh, torch.device(device)
        self.params: list[torch.Tensor] = []

    def barrier(self) -> None:
        pass

    def build_model(self, model_config: ModelConfig, cfg: TrainConfig) -> Transformer:
        model = parallelize(new_model(model_config, cfg, self.device), mesh=self.mesh)  # FP8 if switched on
        apply_speed_paths(model, cfg, self.device)
        return model

    def build_optimizer(self, model: Transformer, make: MakeOptimizer) -> torch.optim.Optimizer:
        opt = make(model)
        self.params = [p for g in opt.param_groups for p in g["params"]]
        return opt

    def forward_backward(
        self,
        loss: LossStep,
        x: torch.Tensor,
        y: torch.Tensor,
        mtp_weight: float,
        micro: int | None,
        packing: Packing = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        sums, counts = accumulate(loss, x, y, mtp_weight, micro, packing)
        return sums, counts, grad_norm(self.params)

    def evaluate(
        self, model: Transformer, windows: np.ndarray, token_bytes: Any, batch_size: int,
        dtype: torch.dtype, max_batches: int | None,
    ) -> dict[str, float]:  # fmt: skip
        return evaluate(model, windows, token_bytes, batch_size, dtype, max_batches, self.device)

    def param_counts(self, model: Transformer) -> tuple[int, int]:
        return model.num_params(), model.num_params(False)

    def gather_model(self, model: Transformer) -> Transformer | None:
        return model

    def on_full_model(self, model: Transformer, fn: Callable[[Transformer], Any]) -> Any:
        return fn(model)


class ExpertDataPlan:
    """pp = 1: experts sharded over ep ranks, everything else replicated over dp * ep ranks (ZeRO-1)."""

    def __init__(self, mesh: Mesh, device: str | torch.device = "cpu"):
        if mesh.pp > 1:
            raise ValueError("pipeline-parallel runs use dsv3.train.pipeline.PipelinePlan")
        self.mesh, self.device = mesh, torch.device(device)
        self.is_main = mesh.rank == 0
        self.data_rank, self.data_size = mesh.data_rank, mesh.data_size
        self.batch_multiple = mesh.data_size
        self.dp: DataParallel | None = None
        self.model_config: ModelConfig | None = None

    def barrier(self) -> None:
        dist.barrier(group=self.mesh.world_group)

    def build_model(self, model_config: ModelConfig, cfg: TrainConfig) -> Transformer:
        self.model_config = model_config
        model = parallelize(new_model(model_config, cfg, self.device), self.mesh.config, self.mesh)
        apply_speed_paths(model, cfg, self.device)
        return model

    def build_optimizer(self, model: Transformer, make: MakeOptimizer) -> ShardedOptimizer:
        self.dp = DataParallel(model, self.mesh, make(model))
        return ShardedOptimizer(self.dp)

    def forward_backward(
        self,
        loss: LossStep,
        x: torch.Tensor,
        y: torch.Tensor,
        mtp_weight: float,
        micro: int | None,
        packing: Packing = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        assert self.dp is not None, "build_optimizer first"
        sums, counts = accumulate(loss, x, y, mtp_weight, micro, packing)
        t = sums.to(self.device, torch.float64, copy=True)  # NCCL reduces device tensors only
        dist.all_reduce(t, group=self.mesh.data_group)
        sums = (t / self.mesh.data_size).to("cpu", torch.float32)
        if counts:
            c = torch.stack(counts).float().to(self.device)
            dist.all_reduce(c, group=self.mesh.data_group)
            counts = [r.cpu() for r in c.unbind(0)]
        self.dp.reduce_gradients()
        return sums, counts, self.dp.grad_norm()

    def evaluate(
        self, model: Transformer, windows: np.ndarray, token_bytes: Any, batch_size: int,
        dtype: torch.dtype, max_batches: int | None,
    ) -> dict[str, float]:  # fmt: skip
        return evaluate(model, windows, token_bytes, batch_size, dtype, max_batches, self.device)

    def param_counts(self, model: Transformer) -> tuple[int, int]:
        assert self.model_config is not None
        with torch.device("meta"):
            full = Transformer(self.model_config)  # this rank holds a share of the experts only
        return full.num_params(), full.num_params(False)

    def gather_model(self, model: Transformer) -> Transformer | None:
        sd = full_state_dict(model, self.mesh)  # collective: every rank takes part
        if not self.is_main:
            return None
        assert self.model_config is not None
        full = Transformer(self.model_config)
        full.load_state_dict(sd)
        return full

    def on_full_model(self, model: Transformer, fn: Callable[[Transformer], Any]) -> Any:
        return fn(model)  # every rank, same inputs: each forward's expert exchange needs them all
