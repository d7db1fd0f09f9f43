"""The run's schedules as pure functions of the optimizer step (0-based) and the run length.

DeepSeek-V3 (REFERENCE.md) states them in tokens over a 14.8T-token run; here they are fractions of
`steps`, so a 1,000-step run has the same shape:
- LR: linear warmup to the peak, constant until decay_start_frac (10T/14.8T), cosine down to
  min_lr_ratio * peak at decay_end_frac (14.3T), that value until the last final_frac (167B), then
  final_lr_ratio * peak (7.3e-6 / 2.2e-4);
- batch size: linear ramp from batch_ramp_start * batch_size over batch_ramp_frac (469B), then constant;
- MTP loss weight: 0.3, then 0.1 after mtp_switch_frac (10T);
- bias update speed gamma: constant, 0 for the last bias_update_off_frac (500B).
Being pure functions of the step, they need no state in a checkpoint beyond the step itself.
"""

from __future__ import annotations

import math

from dsv3.config import TrainConfig


def _frac_steps(frac: float, steps: int) -> int:
    return int(round(frac * steps))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a cfg.steps-step run."""
    n = cfg.steps
    warm = max(_frac_steps(cfg.warmup_frac, n), 1 if cfg.warmup_frac > 0 else 0)
    decay_start = max(_frac_steps(cfg.decay_start_frac, n), warm)
    decay_end = max(_frac_steps(cfg.decay_end_frac, n), decay_start)
    final_start = max(n - _frac_steps(cfg.final_frac, n), decay_end)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if step < decay_start:
        return cfg.lr
    if step < decay_end:
        progress = (step - decay_start) / (decay_end - decay_start)
        ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.lr * ratio
    if step < final_start:
        return cfg.lr * cfg.min_lr_ratio
    return cfg.lr * cfg.final_lr_ratio


def batch_size_at(cfg: TrainConfig, step: int, multiple: int = 1) -> int:
    """Sequences in optimizer step `step`: the ramp, rounded down to a multiple (the data-parallel world)."""
    full = cfg.batch_size
    ramp = _frac_steps(cfg.batch_ramp_frac, cfg.steps)
    if cfg.batch_ramp_start >= 1 or step >= ramp:
        b = full
    else:
        start = cfg.batch_ramp_start * full
        b = int(start + (full - start) * step / ramp)
    return max(multiple, b // multiple * multiple)


def mtp_weight_at(cfg: TrainConfig, step: int) -> float:
    return cfg.mtp_weight if step < _frac_steps(cfg.mtp_switch_frac, cfg.steps) else cfg.mtp_weight_final


def bias_update_speed_at(cfg: TrainConfig, step: int) -> float:
    """gamma for the bias update after optimizer step `step`; 0 in the last bias_update_off_frac."""
    off_from = cfg.steps - _frac_steps(cfg.bias_update_off_frac, cfg.steps)
    return cfg.bias_update_speed if step < off_from else 0.0
