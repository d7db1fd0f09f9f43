"""The training loop, composed of the objects that differ between runs.

`Trainer(model_config, train_config, run_dir, plan=, data=, checkpointer=)` takes
- a parallel plan (dsv3.train.plans: `SinglePlan`, `ExpertDataPlan`; dsv3.train.pipeline:
  `PipelinePlan`): builds the model and optimizer, runs a step's forward and backward and the reductions
  the ranks agree on, evaluates, and gathers the whole model for the export and the sample;
- the data (dsv3.train.setup.TrainData): tokenizer, packed train stream, validation windows;
- a checkpointer (dsv3.train.checkpoint.Checkpointer): the one native format, for every layout.
The loop itself (`train_step`, `fit`) never branches on the layout. `make_trainer`
(dsv3.train.distributed) picks the plan from the environment and wires the parts.

A step: the global batch's rows of this rank -> `plan.forward_backward` -> skip a non-finite step,
else clip, AdamW, balance-bias update. Compute precision and compile: dsv3.train.step.

Bit-exact resume: the schedules are functions of the step, the data order of (seed, epoch, cursor), and
the checkpoint holds weights, biases, optimizer moments and RNG states, so `--stop-at K` then `--resume`
replays exactly the steps an uninterrupted run takes (on CPU, where kernels are deterministic).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dsv3.checkpoint import save_pretrained
from dsv3.config import ModelConfig, TrainConfig
from dsv3.cpu import expert_backends
from dsv3.io import torch_dtype
from dsv3.parallel.launch import StopSignals
from dsv3.train.balance import balance_biases, max_violation, update_balance_bias
from dsv3.train.checkpoint import Checkpointer
from dsv3.train.data import bigram_bpb
from dsv3.train.evaluate import sample_text
from dsv3.train.metrics import MetricsLog
from dsv3.train.optim import AdamW, clip_grads, param_groups, set_lr
from dsv3.train.plans import ParallelPlan
from dsv3.train.schedule import batch_size_at, bias_update_speed_at, lr_at, mtp_weight_at
from dsv3.train.setup import TrainData
from dsv3.train.step import LossStep


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Trainer:
    """The training loop over a plan, data and a checkpointer (see the module docstring)."""

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        run_dir: str | Path,
        *,
        plan: ParallelPlan,
        data: TrainData,
        checkpointer: Checkpointer,
        progress: bool = True,
    ):
        self.model_config = model_config.validate()
        self.cfg = train_config.validate(self.model_config)
        self.run_dir = Path(run_dir)
        self.plan, self.data, self.checkpointer = plan, data, checkpointer
        self.device = plan.device
        self.dtype = torch_dtype(self.cfg.dtype)
        self.progress = progress and plan.is_main
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=plan.is_main)
        self.step = 0  # optimizer steps done
        self.tokens = 0
        self.bad_in_row = 0
        self._bar: tqdm | None = None
        self.model = plan.build_model(self.model_config, self.cfg)
        self.optimizer = plan.build_optimizer(self.model, self._adamw)
        self.loss_step = LossStep(self.model, self.model_config, self.cfg, self.dtype, self.device, self.log)

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        return self.data.tokenizer

    def log(self, msg: str) -> None:
        if not self.plan.is_main:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def _adamw(self, module: nn.Module) -> AdamW:
        c = self.cfg
        return AdamW(
            param_groups(module, c.weight_decay),
            lr=lr_at(c, 0),
            betas=(c.beta1, c.beta2),
            eps=c.eps,
            weight_decay=c.weight_decay,
            moments_dtype=torch_dtype(c.moments_dtype),
        )

    def run_info(self, data_path: str | Path | None = None) -> dict[str, Any]:
        """What RUN_DIR/train_config.json records: both configs, the data, the expert execution strategy."""
        return {
            "model": self.model_config.to_dict(),
            "train": self.cfg.to_dict(),
            "data": str(data_path) if data_path else "bundled:tinyshakespeare",
            "expert_backend": expert_backends(self.model),
        }

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """One optimizer step at self.step: returns its metrics record (a "skip" record if non-finite)."""
        c, step, plan = self.cfg, self.step, self.plan
        t0 = time.perf_counter()
        b = batch_size_at(c, step, multiple=plan.batch_multiple)
        # plain rows (x, y) or packed samples (x, y, positions, segment_ids)
        x, y, *packing = (
            t.to(self.device) for t in self.data.train.next_batch(b, plan.data_rank, plan.data_size)
        )
        mtp_w = mtp_weight_at(c, step)
        sums, counts, norm = plan.forward_backward(
            self.loss_step, x, y, mtp_w, c.micro_batch_size, tuple(packing)
        )
        return self._apply_step(t0, b, mtp_w, sums, counts, norm)

    def _apply_step(
        self,
        t0: float,
        b: int,
        mtp_w: float,
        sums: torch.Tensor,
        counts: list[torch.Tensor],
        norm: torch.Tensor,
    ) -> dict[str, Any]:
        """After the backward (gradients reduced, global norm known): skip a non-finite step, else clip,
        step the optimizer and the balance biases; the metrics record. sums = [total, main, mtp, balance]."""
        c, step = self.cfg, self.step
        finite = bool(torch.isfinite(sums).all()) and bool(torch.isfinite(norm))
        lr, gamma = lr_at(c, step), bias_update_speed_at(c, step)
        self.step += 1
        self.tokens += b * c.seq_len
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row += 1
            what = "loss" if not torch.isfinite(sums).all() else "gradient"
            return {
                "type": "skip",
                "step": self.step,
                "reason": f"non-finite {what}",
                "in_a_row": self.bad_in_row,
            }
        self.bad_in_row = 0
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip_grads(params, c.grad_clip, norm)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_balance_bias(self.model.moe_layers(), counts, gamma)
        dt = time.perf_counter() - t0
        total, main, mtp, bal = (float(v) for v in sums)
        return {
            "type": "train",
            "step": self.step,
            "loss": main,
            "mtp_loss": mtp,
            "balance_loss": bal,
            "total_loss": total,
            "lr": lr,
            "grad_norm": float(norm),
            "tokens_per_s": b * c.seq_len / dt,
            "max_vio": float(np.mean([max_violation(n) for n in counts])) if counts else 0.0,
            "batch_size": b,
            "tokens": self.tokens,
            "mtp_weight": mtp_w,
            "gamma": gamma,
            "expert_load": [[int(v) for v in n.tolist()] for n in counts],
        }

    # ------------------------------------------------------------------ eval / checkpoints / export
    def evaluate(self, max_batches: int | None = None) -> dict[str, Any]:
        c = self.cfg
        windows = self.data.val_windows
        lengths = self.tokenizer.token_byte_lengths
        r = self.plan.evaluate(self.model, windows, lengths, c.batch_size, self.dtype, max_batches)
        full = not max_batches or max_batches * c.batch_size >= len(windows)
        return {"type": "eval", "step": self.step, **r, "full": full}

    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"step": self.step, "steps": self.cfg.steps},
            "data": self.data.train.state_dict(),
            "data_digest": self.data.digest,
            "rng": _rng_state(),
            "balance_biases": balance_biases(self.model.moe_layers()),
            "model_config": self.model_config.to_dict(),
            "train_config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> Path:
        """Collective: this rank's share of the checkpoint, then the HF export of the whole model."""
        path = self.checkpointer.save(self.step, self.model.state_dict(), self.train_state())
        self.export_hf()
        return path

    def load_checkpoint(self) -> Path:
        """Collective: continue from the newest good checkpoint (the same model, data and layout)."""
        path = self.checkpointer.latest()
        if path is None:
            raise ValueError(
                f"--resume: no usable checkpoint in {self.checkpointer.root} (all failed verification)"
            )
        model_state, st = self.checkpointer.load(path)
        if st["model_config"] != self.model_config.to_dict():
            diff = sorted(k for k, v in st["model_config"].items() if self.model_config.to_dict().get(k) != v)
            raise ValueError(f"--resume: the model config differs from the checkpoint's in {diff}")
        if st["data_digest"] != self.data.digest:
            raise ValueError("--resume: the training data (or tokenizer) differs from the checkpoint's")
        changed = sorted(k for k, v in st["train_config"].items() if self.cfg.to_dict().get(k) != v)
        if changed:
            self.log(f"note: resuming with changed train settings {changed} (schedules may shift)")
        self.model.load_state_dict(model_state, strict=True)
        self.optimizer.load_state_dict(st["optimizer"])
        self.data.train.load_state_dict(st["data"])
        _set_rng_state(st["rng"])
        self.step, self.tokens = int(st["step"]), int(st["tokens"])
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {path} (step {self.step})")
        return path

    def export_hf(self) -> Path | None:
        """Collective: RUN_DIR/model, an HF-format directory (fp32 weights, config.json, tokenizer)."""
        full = self.plan.gather_model(self.model)
        if full is None:
            return None
        return save_pretrained(full, self.run_dir / "model", dtype=torch.float32, tokenizer=self.tokenizer)

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to cfg.steps (or stop after step `stop_at` with a checkpoint, as a preemption would).

        A SIGTERM/SIGINT (on any rank) during the loop stops every rank after the step in progress, with a
        checkpoint: the summary then holds `preempted` = the signal (a second signal acts at once)."""
        c = self.cfg
        if stop_at is not None and not 0 < stop_at <= c.steps:
            raise ValueError(f"--stop-at must be in [1, steps={c.steps}], got {stop_at}")
        end = c.steps if stop_at is None else stop_at
        self.metrics.write({"type": "run", "event": "resume" if self.step else "start", "step": self.step})
        params, with_mtp = self.plan.param_counts(self.model)
        self.log(
            f"model: {params / 1e6:.2f}M params (+{(with_mtp - params) / 1e6:.2f}M MTP), "
            f"{c.steps} steps of {c.batch_size}x{c.seq_len} tokens, {c.dtype}, "
            f"experts: {', '.join(expert_backends(self.model)) or 'none'}"
        )
        t_start = time.perf_counter()
        train_time, ema = 0.0, None
        self._bar = tqdm(total=c.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                         disable=not self.progress, file=sys.stderr)  # fmt: skip
        signum: int | None = None
        stop = StopSignals().install()
        try:
            while self.step < end:
                rec = self.train_step()
                if rec["type"] == "skip" or self.step % c.log_every == 0:
                    self.metrics.write(rec)
                if rec["type"] == "skip":
                    self.log(f"step {self.step}: skipped ({rec['reason']}, {self.bad_in_row} in a row)")
                    if self.bad_in_row >= c.max_bad_steps:
                        last = self.checkpointer.list()
                        where = (
                            f"the last checkpoint ({last[-1]}) is intact"
                            if last
                            else "no checkpoint was written"
                        )
                        raise TrainingDiverged(
                            f"stopping at step {self.step}: {self.bad_in_row} non-finite steps in a row "
                            f"(max_bad_steps={c.max_bad_steps}); {where}"
                        )
                else:
                    train_time += rec["batch_size"] * c.seq_len / rec["tokens_per_s"]
                    ema = rec["loss"] if ema is None else 0.9 * ema + 0.1 * rec["loss"]
                    self._bar.set_postfix(
                        loss=f"{ema:.3f}", tok_s=f"{self.tokens / max(train_time, 1e-9):.0f}"
                    )
                self._bar.update(1)
                if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                    ev = self.evaluate(c.eval_batches or None)
                    self.metrics.write(ev)
                    self.log(f"step {self.step}: val_loss {ev['val_loss']:.4f}, val_bpb {ev['val_bpb']:.4f}")
                periodic = c.ckpt_every and self.step % c.ckpt_every == 0 and not self.bad_in_row
                if periodic or self.step == end:  # no periodic save inside a non-finite streak
                    self.save_checkpoint()
                # SIGTERM/SIGINT on any rank: every rank stops after this step, with a checkpoint
                signum = stop.agreed(self.device) if self.step < end else None
                if signum is not None:
                    if not periodic:
                        self.save_checkpoint()
                    break
        finally:
            stop.restore()
            self._bar.close()
            self._bar = None
        summary: dict[str, Any] = {"step": self.step, "steps": c.steps, "tokens": self.tokens}
        summary["train_tokens_per_s"] = self.tokens / train_time if train_time else None
        if signum is not None:
            summary["preempted"] = signum
            self.log(
                f"stopped by signal {signum} after step {self.step} of {c.steps} (checkpoint saved); "
                "continue with --resume"
            )
            return summary
        if self.step < c.steps:
            self.log(
                f"stopped after step {self.step} of {c.steps} (checkpoint saved); continue with --resume"
            )
            return summary
        ev = self.evaluate(None)
        self.metrics.write(ev)
        bigram = bigram_bpb("".join(self.data.train_docs), "".join(self.data.val_docs))
        summary.update(val_loss=ev["val_loss"], val_bpb=ev["val_bpb"], bigram_bpb=bigram, params=params)
        summary["wall_s"] = time.perf_counter() - t_start
        if self.plan.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.log(
            f"final: val_loss {ev['val_loss']:.4f} nats/token, val_bpb {ev['val_bpb']:.4f} "
            f"(byte bigram on the same split: {bigram:.4f}); {self.tokens:,} tokens"
        )
        return summary

    def sample(self, prompt: str = "\n") -> str:
        """Collective: a text sample from the whole model (the same on every rank)."""
        c = self.cfg
        return self.plan.on_full_model(
            self.model,
            lambda m: sample_text(m, self.tokenizer, prompt, c.sample_tokens, c.sample_temperature, c.seed),
        )
