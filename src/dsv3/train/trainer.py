"""The training loop: one process today, built from parts a distributed trainer reuses.

Parts (each a method, so expert/data parallelism can wrap or replace one at a time): build_tokenizer,
build_data, build_model, build_optimizer, train_step (one optimizer step: micro-batches, backward,
non-finite guard, clip, AdamW, bias update), evaluate, save_checkpoint / load_checkpoint, export_hf.
`rank`/`world` already shard the data (rows rank::world of each global batch); `reduce_counts` and
`reduce_scalar` are the hooks where a data-parallel run sums expert loads and averages losses.

Precision: FP32 master weights and gradients always; compute in BF16 under autocast (default: BF16
matmuls are ~4x faster than FP32 on AVX512-BF16 CPUs) or FP32 (dtype=float32). Routing, norms and the
losses run in FP32 inside the model either way.

Bit-exact resume: the schedules are functions of the step, the data order of (seed, epoch, cursor), and
the checkpoint holds weights, biases, optimizer moments and RNG states, so `--stop-at K` then `--resume`
replays exactly the steps an uninterrupted run takes (on CPU, where kernels are deterministic).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dsv3.config import ModelConfig, TrainConfig
from dsv3.model import Transformer, lm_loss
from dsv3.tokenizer import Tokenizer
from dsv3.train import checkpoint as ckpt
from dsv3.train.balance import balance_biases, max_violation, update_balance_bias
from dsv3.train.data import (
    PackedDataset,
    bigram_bpb,
    eval_windows,
    load_corpus,
    split_train_val,
    tokenize_documents,
    tokens_digest,
)
from dsv3.train.evaluate import autocast_context, evaluate, sample_text
from dsv3.train.metrics import MetricsLog
from dsv3.train.optim import AdamW, clip_grads, grad_norm, param_groups, set_lr
from dsv3.train.regularize import add_residual_dropout
from dsv3.train.schedule import batch_size_at, bias_update_speed_at, lr_at, mtp_weight_at

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_TRAIN_CHARS = 50_000_000  # BPE merges are learned from at most this much of the train split


def _first_chars(docs: list[str], limit: int) -> list[str]:
    out, n = [], 0
    for d in docs:
        if n >= limit:
            break
        out.append(d[: limit - n])
        n += len(out[-1])
    return out


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
    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        run_dir: str | Path,
        data: str | Path | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        fp8: bool = False,
        progress: bool = True,
        rank: int = 0,
        world: int = 1,
        device: str | torch.device = "cpu",
    ):
        self.model_config = model_config.validate()
        self.cfg = train_config.validate()
        self.run_dir = Path(run_dir)
        self.data_path = data
        self.fp8 = fp8
        self.progress = progress and rank == 0
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.dtype = DTYPES[self.cfg.dtype]
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=rank == 0)
        self.step = 0  # optimizer steps done
        self.tokens = 0
        self.bad_in_row = 0
        self._bar: tqdm | None = None
        self._prepare_run_dir(resume, overwrite)
        self.tokenizer = self.build_tokenizer()
        self.build_data()
        self.model = self.build_model()
        self.optimizer = self.build_optimizer()
        self._compiled: Any = None
        self._loss_fn = self.compiled_loss if self.cfg.compile else self.forward_loss
        if resume:
            self.load_checkpoint()

    # ------------------------------------------------------------------ setup
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def log(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> None:
        if resume and overwrite:
            raise ValueError("--resume and --overwrite contradict each other")
        has_run = ckpt.list_checkpoints(self.ckpt_dir) or (self.run_dir / "metrics.jsonl").exists()
        if resume:
            if not ckpt.list_checkpoints(self.ckpt_dir):
                raise ValueError(f"--resume: no checkpoint in {self.ckpt_dir}")
        elif has_run:
            if not overwrite:
                raise ValueError(
                    f"{self.run_dir} already holds a run: "
                    "pass --resume to continue it or --overwrite to start over"
                )
            if self.rank == 0:
                for sub in ("checkpoints", "model", "tokenizer"):
                    shutil.rmtree(self.run_dir / sub, ignore_errors=True)
                for f in ("metrics.jsonl", "summary.json"):
                    (self.run_dir / f).unlink(missing_ok=True)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            info = {
                "model": self.model_config.to_dict(),
                "train": self.cfg.to_dict(),
                "data": str(self.data_path) if self.data_path else "bundled:tinyshakespeare",
                "fp8": self.fp8,
            }
            (self.run_dir / "train_config.json").write_text(json.dumps(info, indent=2) + "\n")

    def build_tokenizer(self) -> Tokenizer:
        """The run's tokenizer: RUN_DIR/tokenizer if present, else BPE trained on the train split."""
        tdir = self.run_dir / "tokenizer"
        self._docs = load_corpus(self.data_path)
        self._train_docs, self._val_docs = split_train_val(self._docs, self.cfg.val_frac)
        if (tdir / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(tdir)
        else:
            t0 = time.perf_counter()
            tok = Tokenizer.train(
                _first_chars(self._train_docs, TOKENIZER_TRAIN_CHARS), self.model_config.vocab_size
            )
            if self.rank == 0:
                tok.save(tdir, model_max_length=self.model_config.max_position_embeddings)
            dt = time.perf_counter() - t0
            self.log(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, trained in {dt:.1f}s")
        if tok.vocab_size > self.model_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tok.vocab_size} tokens "
                f"but the model's vocab_size is {self.model_config.vocab_size}"
            )
        return tok

    def build_data(self) -> None:
        tok = self.tokenizer
        train_tokens = tokenize_documents(tok, self._train_docs)
        val_tokens = tokenize_documents(tok, self._val_docs)
        self.data_digest = tokens_digest(train_tokens)
        self.data = PackedDataset(
            train_tokens,
            self.cfg.seq_len,
            seed=self.cfg.seed,
            fim_rate=self.cfg.fim_rate,
            fim_ids=tok.fim_ids,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
        )
        self.val_windows = eval_windows(val_tokens, self.cfg.seq_len)
        self.log(
            f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens "
            f"({sum(len(d.encode()) for d in self._train_docs) / len(train_tokens):.2f} bytes per token)"
        )

    def build_model(self) -> Transformer:
        torch.manual_seed(self.cfg.seed)
        model = Transformer(self.model_config)
        if self.fp8:
            try:
                from dsv3.fp8 import convert_to_fp8
            except ImportError:
                raise ValueError(
                    "--fp8 needs dsv3.fp8.convert_to_fp8, which this build does not have"
                ) from None
            model = convert_to_fp8(model) or model
        add_residual_dropout(model, self.cfg.dropout)
        return model.to(self.device).train()

    def build_optimizer(self, module: torch.nn.Module | None = None) -> AdamW:
        """AdamW over `module`'s parameters (default: the whole model)."""
        c = self.cfg
        return AdamW(
            param_groups(self.model if module is None else module, c.weight_decay),
            lr=lr_at(c, 0),
            betas=(c.beta1, c.beta2),
            eps=c.eps,
            weight_decay=c.weight_decay,
            moments_dtype=DTYPES[c.moments_dtype],
        )

    # ------------------------------------------------------------------ hooks for data parallelism
    def reduce_counts(self, counts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer expert loads of the global batch (a data-parallel trainer all-reduces here)."""
        return counts

    def reduce_scalar(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over data-parallel ranks of a local scalar (identity in one process)."""
        return x

    def reduce_gradients(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Global gradient norm of the step (a data-parallel trainer first reduces the gradients here)."""
        return grad_norm(params)

    # ------------------------------------------------------------------ one step
    @property
    def balance_alpha(self) -> float:
        a = self.cfg.balance_alpha
        return self.model_config.aux_loss_alpha if a is None else a

    def forward_loss(
        self, x: torch.Tensor, y: torch.Tensor, mtp_weight: float | torch.Tensor
    ) -> tuple[Any, list[torch.Tensor]]:
        with autocast_context(self.dtype, self.device):
            out = self.model(x)
            losses = lm_loss(out, y, mtp_weight, self.balance_alpha, self.cfg.balance_loss)
        return losses, [s.counts for s in out.router_stats]

    def compiled_loss(
        self, x: torch.Tensor, y: torch.Tensor, mtp_weight: float | torch.Tensor
    ) -> tuple[Any, list[torch.Tensor]]:
        """forward_loss through torch.compile; if compiling fails (no C++ compiler, an unsupported op), say
        so once and train eagerly. The MTP weight goes in as a tensor so its switch does not recompile."""
        if self._compiled is None:
            self._compiled = torch.compile(self.forward_loss)
        try:
            return self._compiled(x, y, torch.tensor(mtp_weight))
        except Exception as e:  # compilation happens inside the first calls: fall back, do not crash the run
            if getattr(self, "_compile_ok", False):
                raise
            self.log(
                f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); eager"
            )
            self._loss_fn = self.forward_loss
            return self.forward_loss(x, y, mtp_weight)
        finally:
            self._compile_ok = self._loss_fn is self.compiled_loss

    def train_step(self) -> dict[str, Any]:
        """One optimizer step at self.step: returns its metrics record (a "skip" record if non-finite)."""
        c, step = self.cfg, self.step
        t0 = time.perf_counter()
        b = batch_size_at(c, step, multiple=self.world)
        x, y = self.data.next_batch(b, self.rank, self.world)
        x, y = x.to(self.device), y.to(self.device)
        mtp_w = mtp_weight_at(c, step)
        micro = c.micro_batch_size or x.shape[0]
        sums = torch.zeros(4, dtype=torch.float32)  # total, main, mtp, balance
        counts: list[torch.Tensor] | None = None
        for i in range(0, x.shape[0], micro):
            xb, yb = x[i : i + micro], y[i : i + micro]
            frac = xb.shape[0] / x.shape[0]
            losses, layer_counts = self._loss_fn(xb, yb, mtp_w)
            (losses.loss * frac).backward()
            parts = [losses.loss.detach(), losses.main_loss, losses.mtp_loss, losses.balance_loss]
            sums += torch.stack([p.float().cpu() for p in parts]) * frac
            lc = [t.detach().float().cpu() for t in layer_counts]
            counts = lc if counts is None else [a + b_ for a, b_ in zip(counts, lc)]
        sums = self.reduce_scalar(sums)
        counts = self.reduce_counts(counts or [])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = self.reduce_gradients(params)
        return self.apply_step(t0, b, mtp_w, sums, counts, params, norm)

    def apply_step(
        self,
        t0: float,
        b: int,
        mtp_w: float,
        sums: torch.Tensor,
        counts: list[torch.Tensor],
        params: list[torch.Tensor],
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
    def param_counts(self) -> tuple[int, int]:
        """(main model, main + MTP) parameter counts."""
        return self.model.num_params(), self.model.num_params(False)

    def evaluate(self, max_batches: int | None = None, model: Transformer | None = None) -> dict[str, Any]:
        r = evaluate(
            self.model if model is None else model,
            self.val_windows,
            self.tokenizer.token_byte_lengths,
            batch_size=self.cfg.batch_size,
            dtype=self.dtype,
            max_batches=max_batches,
            device=self.device,
        )
        full = not max_batches or max_batches * self.cfg.batch_size >= len(self.val_windows)
        return {"type": "eval", "step": self.step, **r, "full": full}

    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"step": self.step, "steps": self.cfg.steps},
            "data": self.data.state_dict(),
            "data_digest": self.data_digest,
            "rng": _rng_state(),
            "balance_biases": balance_biases(self.model.moe_layers()),
            "model_config": self.model_config.to_dict(),
            "train_config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        path = ckpt.save_checkpoint(
            self.ckpt_dir,
            self.step,
            self.model.state_dict(),
            self.train_state(),
            keep=self.cfg.keep_checkpoints,
        )
        self.export_hf()
        return path

    def read_checkpoint(self) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
        """The newest good checkpoint: (path, model state, train state) (sharded under data parallelism)."""
        path = ckpt.latest_good_checkpoint(self.ckpt_dir, warn=self.log)
        if path is None:
            raise ValueError(f"--resume: no usable checkpoint in {self.ckpt_dir} (all failed verification)")
        model_state, st = ckpt.load_checkpoint(path)
        return path, model_state, st

    def load_checkpoint(self) -> Path:
        path, model_state, st = self.read_checkpoint()
        if st["model_config"] != self.model_config.to_dict():
            diff = sorted(k for k, v in st["model_config"].items() if self.model_config.to_dict().get(k) != v)
            raise ValueError(f"--resume: the model config differs from the checkpoint's in {diff}")
        if st["data_digest"] != self.data_digest:
            raise ValueError("--resume: the training data (or tokenizer) differs from the checkpoint's")
        changed = sorted(k for k, v in st["train_config"].items() if self.cfg.to_dict().get(k) != v)
        if changed:
            self.log(f"note: resuming with changed train settings {changed} (schedules may shift)")
        self.model.load_state_dict(model_state, strict=True)
        self.optimizer.load_state_dict(st["optimizer"])
        self.data.load_state_dict(st["data"])
        _set_rng_state(st["rng"])
        self.step, self.tokens = int(st["step"]), int(st["tokens"])
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {path} (step {self.step})")
        return path

    def export_hf(self, model: Transformer | None = None) -> Path | None:
        """RUN_DIR/model: an HF-format directory (fp32 weights, config.json, tokenizer) for inference."""
        try:
            from dsv3.checkpoint import save_pretrained
        except ImportError:
            return None
        return save_pretrained(
            self.model if model is None else model,
            self.run_dir / "model",
            dtype=torch.float32,
            tokenizer=self.tokenizer,
        )

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to cfg.steps (or stop after step `stop_at` with a checkpoint, as a preemption would)."""
        c = self.cfg
        if stop_at is not None and not 0 < stop_at <= c.steps:
            raise ValueError(f"--stop-at must be in [1, steps={c.steps}], got {stop_at}")
        end = c.steps if stop_at is None else stop_at
        self.metrics.write({"type": "run", "event": "resume" if self.step else "start", "step": self.step})
        params, with_mtp = self.param_counts()
        self.log(
            f"model: {params / 1e6:.2f}M params (+{(with_mtp - params) / 1e6:.2f}M MTP), "
            f"{c.steps} steps of {c.batch_size}x{c.seq_len} tokens, {c.dtype}"
        )
        t_start = time.perf_counter()
        train_time, ema = 0.0, None
        self._bar = tqdm(total=c.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                         disable=not self.progress, file=sys.stderr)  # fmt: skip
        try:
            while self.step < end:
                rec = self.train_step()
                if rec["type"] == "skip" or self.step % c.log_every == 0:
                    self.metrics.write(rec)
                if rec["type"] == "skip":
                    self.log(f"step {self.step}: skipped ({rec['reason']}, {self.bad_in_row} in a row)")
                    if self.bad_in_row >= c.max_bad_steps:
                        last = ckpt.list_checkpoints(self.ckpt_dir)
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
        finally:
            self._bar.close()
            self._bar = None
        summary: dict[str, Any] = {"step": self.step, "steps": c.steps, "tokens": self.tokens}
        summary["train_tokens_per_s"] = self.tokens / train_time if train_time else None
        if self.step < c.steps:
            self.log(
                f"stopped after step {self.step} of {c.steps} (checkpoint saved); continue with --resume"
            )
            return summary
        ev = self.evaluate(None)
        self.metrics.write(ev)
        bigram = bigram_bpb("".join(self._train_docs), "".join(self._val_docs))
        summary.update(val_loss=ev["val_loss"], val_bpb=ev["val_bpb"], bigram_bpb=bigram, params=params)
        summary["wall_s"] = time.perf_counter() - t_start
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.log(
            f"final: val_loss {ev['val_loss']:.4f} nats/token, val_bpb {ev['val_bpb']:.4f} "
            f"(byte bigram on the same split: {bigram:.4f}); {self.tokens:,} tokens"
        )
        return summary

    def sample(self, prompt: str = "\n", model: Transformer | None = None) -> str:
        return sample_text(
            self.model if model is None else model,
            self.tokenizer,
            prompt,
            self.cfg.sample_tokens,
            self.cfg.sample_temperature,
            self.cfg.seed,
        )
