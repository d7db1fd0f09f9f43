"""`convert_to_fp8(model, config, filter)`: swap a model's Linear and grouped-expert modules for FP8 ones.

What converts by default (the paper's split): every nn.Linear except the output head — the MLA
projections wq / wq_a / wq_b / wkv_a / wkv_b / wo, dense MLP and shared-expert w1 / w2 / w3, the MTP
eh_proj — and the routed experts' stacked GEMMs. What stays in high precision: the embedding and the
output head, the MoE gate (its affinities are computed in fp32 by `Gate.scores`), every RMSNorm and
the attention core (softmax(QK^T)V and the absorbed-decode einsums). Parameters are shared with the
modules they replace: master weights stay fp32, state-dict keys do not change, an optimizer built
before conversion keeps working.

This is the first step of the fixed parallelisation order (FP8, expert parallel, activation
checkpointing, compile, data parallel): apply it to the single-device model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dsv3.fp8.config import FP8Config
from dsv3.fp8.grouped import FP8GroupedExperts
from dsv3.fp8.linear import FP8Linear
from dsv3.model.mla import MLA
from dsv3.model.moe import GroupedExperts

HIGH_PRECISION_LINEARS = ("head",)  # module names (last component) never converted by the default filter

ModuleFilter = Callable[[str, nn.Module], bool]


def default_filter(name: str, module: nn.Module) -> bool:
    """Convert every Linear and GroupedExperts except the output head."""
    return name.rsplit(".", 1)[-1] not in HIGH_PRECISION_LINEARS


def convert_to_fp8(model: nn.Module, config: Any = None, filter: ModuleFilter | None = None) -> nn.Module:
    """Swap, in place, each nn.Linear (-> FP8Linear) and GroupedExperts (-> FP8GroupedExperts) for which
    `filter(qualified_name, module)` is true (default: all but the output head). Returns the model.

    config: an FP8Config, a dict of its fields, None (defaults) or a run config dataclass whose `fp8`
    attribute is one of those. Modules already converted are left alone, so calling it twice is harmless."""
    cfg = FP8Config.resolve(config)
    keep = default_filter if filter is None else filter
    if not callable(keep):
        raise ValueError(f"filter must be a callable (name, module) -> bool, got {type(filter).__name__}")
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is nn.Linear and keep(name, child):
                swaps.append((parent, child_name, FP8Linear.from_linear(child, cfg, name)))
            elif type(child) is GroupedExperts and cfg.experts and keep(name, child):
                swaps.append((parent, child_name, FP8GroupedExperts.from_experts(child, cfg, name)))
    for parent, child_name, new in swaps:
        setattr(parent, child_name, new)
    for m in model.modules():
        if type(m) is MLA and isinstance(m.wkv_b, FP8Linear):
            m.__class__ = FP8MLA
    return model


class FP8MLA(MLA):
    """MLA with an FP8 wkv_b: the absorbed (decode) path folds the weight the FP8 GEMMs see, so decode
    over the latent equals the naive path's FP8 products."""

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_wkv_b(self.wkv_b.dequantized_weight(), dtype)


def fp8_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the FP8 modules in a model."""
    return [n for n, m in model.named_modules() if isinstance(m, FP8Linear | FP8GroupedExperts)]
