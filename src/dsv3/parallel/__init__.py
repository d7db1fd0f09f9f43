"""Parallelism applied from outside to a built single-device model (the model code never changes).

`parallelize(model, parallel_config, mesh)` applies, in this fixed order (DESIGN.md):
1. FP8 conversion of the Linear layers and experts (dsv3.fp8; `ParallelConfig.fp8` is the one switch),
2. expert parallelism (each MoE becomes an `ExpertParallelMoE` holding this rank's experts),
3. data parallelism (replicas made identical; gradients are then reduced by a `DataParallel` object,
   which also shards the optimizer states: ZeRO-1).
Compilation is the trainer's (`TrainConfig.compile` compiles its loss step, model and losses together,
after this); activation checkpointing is not implemented. Pipeline stages are cut by
dsv3.parallel.pipeline after `parallelize`; it also accepts such a stage module.
"""

from __future__ import annotations

from torch import nn

from dsv3.fp8 import convert_to_fp8
from dsv3.model.moe import MoE
from dsv3.parallel.data_parallel import DataParallel
from dsv3.parallel.dist_checkpoint import full_state_dict, load_full_state_dict
from dsv3.parallel.expert_parallel import (
    ExpertParallelMoE,
    ep_moe_layers,
    global_expert_counts,
    load_report,
    route,
)
from dsv3.parallel.launch import DistEnv, env_from_environ, free_port, init_distributed, run_local, spawn
from dsv3.parallel.mesh import Mesh, ParallelConfig, build_mesh


def _apply_expert_parallel(model: nn.Module, mesh: Mesh) -> int:
    """Replace every MoE child (main layers and MTP blocks) by its expert-parallel version."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
                setattr(parent, name, ExpertParallelMoE(child, mesh))
                replaced += 1
    return replaced


def parallelize(
    model: nn.Module, parallel_config: ParallelConfig | None = None, mesh: Mesh | None = None
) -> nn.Module:
    """Apply FP8, expert parallel and data parallel (in that order).

    Call on every rank with identically built models; returns the (modified in place) model."""
    if parallel_config is None and mesh is None:
        raise ValueError("parallelize needs a ParallelConfig or a Mesh")
    if mesh is None:
        mesh = build_mesh(parallel_config)
    pc = parallel_config or mesh.config
    if pc != mesh.config:
        raise ValueError("parallel_config differs from the mesh's config; build the mesh from it")
    model_config = getattr(model, "config", None)
    pc.validate(model_config)
    # 1. FP8 conversion
    if pc.fp8:
        convert_to_fp8(model)  # the default FP8 recipe (dsv3.fp8.FP8Config)
    # 2. expert parallel
    if pc.ep > 1 or pc.node_limit is not None or pc.fp8_dispatch or pc.bf16_combine:
        _apply_expert_parallel(model, mesh)
    # 3. data parallel: identical replicas (gradient reduction and ZeRO-1 live in DataParallel)
    if mesh.data_size > 1:
        DataParallel(model, mesh, zero1=False).broadcast_parameters()
    return model


__all__ = [
    "DataParallel",
    "DistEnv",
    "ExpertParallelMoE",
    "Mesh",
    "ParallelConfig",
    "build_mesh",
    "env_from_environ",
    "ep_moe_layers",
    "free_port",
    "full_state_dict",
    "global_expert_counts",
    "init_distributed",
    "load_full_state_dict",
    "load_report",
    "parallelize",
    "route",
    "run_local",
    "spawn",
]
