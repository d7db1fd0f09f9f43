"""CPU speed paths, applied to a built model from outside (the model in `dsv3.model` is the reference).

Each path is its reference layer with a faster forward for CPU shapes and dtypes, swapped in by class
(parameters, names and state dicts unchanged) or, for MLA's attention core, set as `MLA.attention`:

- training (`apply_cpu_training`, the trainer calls it on CPU): BF16 matmul attention and padded-SDPA
  (`attention.py`), RMSNorm with a lean backward (`norm.py`), and an expert backend (`experts.py`:
  "padded" by default);
- inference (`apply_cpu_inference`, the engine calls it on CPU): packed GEMVs, fused norms, embedding-bag
  experts, cached absorbed weights, a RoPE table (`decode.py`).
"""

from __future__ import annotations

from torch import nn

from dsv3.cpu.attention import cpu_attention
from dsv3.cpu.decode import apply_cpu_inference
from dsv3.cpu.experts import EXPERT_BACKENDS, ActiveExperts, PaddedExperts, padded_slots
from dsv3.cpu.norm import TrainingRMSNorm
from dsv3.model.layers import RMSNorm
from dsv3.model.mla import MLA
from dsv3.model.moe import GroupedExperts


def set_expert_backend(model: nn.Module, name: str) -> int:
    """Run every routed-expert module of `model` with the named strategy (`EXPERT_BACKENDS`); returns
    how many were switched. Only the reference family is switched: FP8 or weight-gradient-split experts
    keep their own forward (their `backend` names them)."""
    if name not in EXPERT_BACKENDS:
        raise ValueError(f"expert backend must be one of {sorted(EXPERT_BACKENDS)}, got {name!r}")
    n = 0
    for m in model.modules():
        if type(m) in EXPERT_BACKENDS.values():
            m.__class__ = EXPERT_BACKENDS[name]
            n += 1
    return n


def expert_backends(model: nn.Module) -> list[str]:
    """The distinct expert backends a model runs, in module order (what a run's log prints)."""
    names = [m.backend for m in model.modules() if isinstance(m, GroupedExperts)]
    return list(dict.fromkeys(names))


def apply_cpu_training(model: nn.Module, expert_backend: str = "padded") -> nn.Module:
    """CPU training speed paths: matmul/padded attention cores, lean-backward RMSNorm, the expert
    backend."""
    for m in model.modules():
        if isinstance(m, MLA):
            m.attention = cpu_attention
        elif type(m) is RMSNorm:
            m.__class__ = TrainingRMSNorm
    set_expert_backend(model, expert_backend)
    return model


__all__ = [
    "EXPERT_BACKENDS",
    "ActiveExperts",
    "PaddedExperts",
    "TrainingRMSNorm",
    "apply_cpu_inference",
    "apply_cpu_training",
    "cpu_attention",
    "expert_backends",
    "padded_slots",
    "set_expert_backend",
]
