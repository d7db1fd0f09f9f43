"""Full <-> sharded state dicts of an expert-parallel model (for the HF export and loading one).

`full_state_dict(model, mesh)` gathers the routed experts from the EP ranks into the single-device
names and shapes; `load_full_state_dict(model, sd, mesh)` does the reverse slice. Native training
checkpoints (every rank's shard, one manifest, written atomically) are dsv3.train.checkpoint's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dsv3.parallel.expert_parallel import ExpertParallelMoE
from dsv3.parallel.mesh import Mesh, group_size


# --------------------------------------------------------------------------- full <-> sharded
def _expert_names(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelMoE):
            for w in ("w1", "w2", "w3"):
                out[f"{name}.experts.{w}"] = mod
    return out


@torch.no_grad()
def full_state_dict(model: nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """Collective over the EP group: the single-device state dict (experts concatenated over EP ranks)."""
    if mesh.pp > 1:
        raise ValueError("gathering a full state dict of a pipeline-parallel model is not supported")
    sd = model.state_dict()
    experts = _expert_names(model)
    for name, mod in experts.items():
        shard = sd[name].contiguous()
        n = group_size(mod.group)
        if n > 1:
            full = shard.new_empty((n * shard.shape[0], *shard.shape[1:]))
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(full, shard, group=mod.group)
            sd[name] = full
    return sd


@torch.no_grad()
def load_full_state_dict(
    model: nn.Module, sd: dict[str, torch.Tensor], mesh: Mesh, strict: bool = True
) -> None:
    """Load a single-device state dict into a parallelized model (each rank keeps its expert slice)."""
    experts = _expert_names(model)
    local = {}
    for k, v in sd.items():
        if k in experts:
            lo, hi = experts[k].expert_range
            if v.shape[0] != experts[k].n_routed_experts:
                raise ValueError(
                    f"{k}: expected {experts[k].n_routed_experts} experts, got shape {tuple(v.shape)}"
                )
            v = v[lo:hi]
        local[k] = v
    model.load_state_dict(local, strict=strict)
