"""Training time and cost: GPU hours and dollars for N tokens on G GPUs, and model FLOPs utilisation.

Throughput can be given three ways, and the other two follow:
- an MFU: tokens/s per GPU = MFU x peak FLOP/s / training FLOPs per token;
- a measured throughput in tokens/s per GPU: the implied MFU = throughput x FLOPs per token / peak;
- GPU hours per trillion tokens (how the report states it: 180K H800 GPU hours per trillion tokens).
GPU hours = tokens / (tokens/s per GPU) / 3600; wall-clock = GPU hours / G; dollars = GPU hours x price.
MFU is relative to the dense BF16 peak by default (`precision="fp8"` for the FP8 peak, half as large a
fraction on Hopper), counting the training FLOPs of flops.py (attention and MTP included).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from dsv3.plan.hardware import Hardware

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class TrainCost:
    tokens: float
    gpus: int
    hardware: str
    precision: str  # MFU basis
    flops_per_token: float
    peak_flops: float  # per GPU, at `precision`
    tokens_per_gpu_s: float
    mfu: float
    gpu_hours: float
    days: float  # wall-clock on `gpus` GPUs
    price_per_gpu_hour: float
    dollars: float
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _positive(name: str, v: float) -> None:
    if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive number, got {v!r}")


def training_cost(
    tokens: float,
    gpus: int,
    flops_per_token: float,
    hardware: Hardware,
    *,
    mfu: float | None = None,
    tokens_per_gpu_s: float | None = None,
    gpu_hours_per_trillion: float | None = None,
    precision: str = "bf16",
    price: float = 2.0,
) -> TrainCost:
    """GPU hours, days and dollars to train on `tokens` tokens; exactly one throughput argument is needed."""
    _positive("tokens", tokens)
    _positive("flops_per_token", flops_per_token)
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    if not (isinstance(price, int | float) and math.isfinite(price) and price >= 0):
        raise ValueError(f"price must be >= 0, got {price!r}")
    given = [x is not None for x in (mfu, tokens_per_gpu_s, gpu_hours_per_trillion)]
    if sum(given) != 1:
        raise ValueError("give exactly one of: mfu, tokens per GPU per second, GPU hours per trillion tokens")
    peak = hardware.peak_flops(precision)
    if mfu is not None:
        _positive("mfu", mfu)
        if mfu > 1:
            raise ValueError(f"mfu is a fraction of peak and must be <= 1, got {mfu}")
        tps = mfu * peak / flops_per_token
    elif tokens_per_gpu_s is not None:
        _positive("tokens per GPU per second", tokens_per_gpu_s)
        tps = tokens_per_gpu_s
    else:
        _positive("GPU hours per trillion tokens", gpu_hours_per_trillion)
        tps = 1e12 / (gpu_hours_per_trillion * SECONDS_PER_HOUR)
    implied = tps * flops_per_token / peak
    warnings = []
    if implied > 1:
        warnings.append(
            f"implied MFU {implied:.2f} > 1: the throughput exceeds {hardware.name}'s {precision} peak "
            "for this model"
        )
    gpu_hours = tokens / tps / SECONDS_PER_HOUR
    return TrainCost(
        tokens=float(tokens),
        gpus=gpus,
        hardware=hardware.name,
        precision=precision,
        flops_per_token=flops_per_token,
        peak_flops=peak,
        tokens_per_gpu_s=tps,
        mfu=implied,
        gpu_hours=gpu_hours,
        days=gpu_hours / gpus / 24,
        price_per_gpu_hour=float(price),
        dollars=gpu_hours * price,
        warnings=warnings,
    )
