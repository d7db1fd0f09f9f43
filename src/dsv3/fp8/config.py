"""FP8 recipe settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dsv3.fp8.backends import BACKENDS
from dsv3.fp8.quant import NONFINITE_MODES


@dataclass(frozen=True)
class FP8Config:
    """How FP8 GEMMs are run.

    backend: "auto" (Triton on an FP8 GPU, else emulated), "emulated", "triton" or "scaled_mm".
    pow2_scales: round every tile/block scale up to a power of two (exact rescaling).
    nonfinite: "raise" (FP8NonFiniteError names the tensor) or "propagate" (NaN results, cheap on GPU:
        no host sync per GEMM).
    experts: also convert the MoE's grouped experts (stacked w1/w2/w3).
    """

    backend: str = "auto"
    pow2_scales: bool = False
    nonfinite: str = "raise"
    experts: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"invalid fp8 config: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.nonfinite not in NONFINITE_MODES:
            raise ValueError(
                f"invalid fp8 config: nonfinite must be one of {NONFINITE_MODES}, got {self.nonfinite!r}"
            )
        for name in ("pow2_scales", "experts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"invalid fp8 config: {name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def resolve(cls, config: Any = None) -> FP8Config:
        """FP8Config from None (defaults), an FP8Config, a mapping of its fields, or a run/model config
        dataclass (its `fp8` attribute when that is an FP8Config or mapping, else the defaults)."""
        if config is None:
            return cls()
        if isinstance(config, FP8Config):
            return config
        if isinstance(config, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise ValueError(f"invalid fp8 config: unknown field(s) {unknown}; known: {sorted(known)}")
            return cls(**config)
        if dataclasses.is_dataclass(config):
            inner = getattr(config, "fp8", None)
            return cls.resolve(inner) if isinstance(inner, FP8Config | Mapping) else cls()
        raise ValueError(f"fp8 config must be an FP8Config, a dict or None, got {type(config).__name__}")
