"""The loss of a training step: a micro-batch's forward and losses, and the gradient-accumulation loop.

Precision: FP32 master weights and gradients always; compute in BF16 under autocast (the default: BF16
matmuls are ~4x faster than FP32 on AVX512-BF16 CPUs) or FP32 (dtype=float32). Routing, norms and the
losses run in FP32 inside the model either way.

`TrainConfig.compile` is the one switch for torch.compile: `LossStep` compiles the forward and the
losses together; if compiling fails (no C++ compiler, an unsupported op) it says so once and trains
eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dsv3.checkpoint import from_pretrained
from dsv3.config import ModelConfig, TrainConfig
from dsv3.cpu import apply_cpu_training, set_expert_backend
from dsv3.model import Transformer, lm_loss
from dsv3.train.regularize import add_residual_dropout

LossFn = Callable[..., tuple[Any, list[torch.Tensor]]]  # (x, y, mtp_weight, packing) -> (losses, counts)

# Packed samples (SFT): (positions [B, T] restarting per sample, segment_ids [B, T]), or () for plain rows.
Packing = tuple[torch.Tensor, ...]


def autocast_context(
    dtype: torch.dtype, device: torch.device | str = "cpu"
) -> contextlib.AbstractContextManager:
    """BF16 autocast (FP32 master weights) or nothing for FP32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def balance_alpha(model_config: ModelConfig, cfg: TrainConfig) -> float:
    """Weight of the balance loss: the train setting, else the model's aux_loss_alpha."""
    return model_config.aux_loss_alpha if cfg.balance_alpha is None else cfg.balance_alpha


def new_model(model_config: ModelConfig, cfg: TrainConfig, device: torch.device) -> Transformer:
    """The run's seeded single-device model with its residual dropout, in training mode on `device`
    (every rank builds the same one; parallelism is applied to it afterwards)."""
    torch.manual_seed(cfg.seed)
    model = Transformer(model_config)
    if cfg.init_from is not None:  # start from trained weights (they must fit this config)
        model.load_state_dict(from_pretrained(cfg.init_from, dtype=torch.float32).state_dict())
    add_residual_dropout(model, cfg.dropout)
    return model.to(device).train()


def apply_speed_paths(
    model: nn.Module, cfg: TrainConfig, device: torch.device, auto: str | None = None
) -> None:
    """The speed paths a run applies to its built (FP8-converted, parallelized) model: on CPU the
    attention cores and expert layouts of `dsv3.cpu.apply_cpu_training`; elsewhere the expert backend.
    `cfg.expert_backend` "auto" is `auto` if given, else "padded" on CPU and "grouped_mm" elsewhere.
    FP8 and weight-gradient-split experts keep their own forward."""
    backend = cfg.expert_backend
    if backend == "auto":
        backend = auto or ("padded" if device.type == "cpu" else "grouped_mm")
    if device.type == "cpu":
        apply_cpu_training(model, backend)
    else:
        set_expert_backend(model, backend)


class LossStep:
    """(losses, per-layer expert counts) of one micro-batch, eagerly or through torch.compile."""

    def __init__(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        cfg: TrainConfig,
        dtype: torch.dtype,
        device: torch.device,
        log: Callable[[str], None] = print,
    ):
        self.model, self.dtype, self.device, self.log = model, dtype, device, log
        self.alpha, self.balance_loss = balance_alpha(model_config, cfg), cfg.balance_loss
        self._compiled: Any = None
        self._compile_ok = False
        self.fn: LossFn = self.compiled if cfg.compile else self.eager

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, mtp_weight: float, packing: Packing = ()
    ) -> tuple[Any, list[torch.Tensor]]:
        return self.fn(x, y, mtp_weight, packing)

    def eager(
        self, x: torch.Tensor, y: torch.Tensor, mtp_weight: float | torch.Tensor, packing: Packing = ()
    ) -> tuple[Any, list[torch.Tensor]]:
        positions, segment_ids = packing or (None, None)
        with autocast_context(self.dtype, self.device):
            out = self.model(x, positions=positions, segment_ids=segment_ids)
            losses = lm_loss(out, y, mtp_weight, self.alpha, self.balance_loss)
        return losses, [s.counts for s in out.router_stats]

    def compiled(
        self, x: torch.Tensor, y: torch.Tensor, mtp_weight: float, packing: Packing = ()
    ) -> tuple[Any, list[torch.Tensor]]:
        """`eager` through torch.compile; the MTP weight goes in as a tensor so its switch does not
        recompile. Compilation happens inside the first calls: a failure there falls back to eager."""
        if self._compiled is None:
            self._compiled = torch.compile(self.eager)
        try:
            out = self._compiled(x, y, torch.tensor(mtp_weight), packing)
        except Exception as e:
            if self._compile_ok:
                raise
            first = str(e).splitlines()[0][:120] if str(e) else ""
            self.log(f"warning: torch.compile failed ({type(e).__name__}: {first}); eager")
            self.fn = self.eager
            return self.eager(x, y, mtp_weight, packing)
        self._compile_ok = True
        return out


def accumulate(
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    mtp_weight: float,
    micro: int | None,
    packing: Packing = (),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward over micro-batches of `micro` rows (None: all at once), each loss scaled by
    its share of the batch: ([total, main, mtp, balance] loss sums, per-layer expert counts)."""
    micro = micro or x.shape[0]
    sums = torch.zeros(4, dtype=torch.float32)
    counts: list[torch.Tensor] | None = None
    for i in range(0, x.shape[0], micro):
        xb, yb = x[i : i + micro], y[i : i + micro]
        frac = xb.shape[0] / x.shape[0]
        losses, layer_counts = loss_fn(xb, yb, mtp_weight, tuple(t[i : i + micro] for t in packing))
        (losses.loss * frac).backward()
        parts = [losses.loss.detach(), losses.main_loss, losses.mtp_loss, losses.balance_loss]
        sums += torch.stack([p.float().cpu() for p in parts]) * frac
        lc = [t.detach().float().cpu() for t in layer_counts]
        counts = lc if counts is None else [a + b for a, b in zip(counts, lc)]
    return sums, counts or []
