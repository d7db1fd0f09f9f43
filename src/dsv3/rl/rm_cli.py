"""`dsv3 rm`: train a reward model (dsv3.rl.reward_model) on preference pairs with the Bradley-Terry loss.

    dsv3 rm --from SRC (--data PREFS | --task add:digits=2) --out RUN [--epochs E] [--steps N] [key=value ...]

SRC is a run directory or an HF model directory. PREFS is JSONL (or a directory of it) in TRL's explicit-
prompt preference format, one pair a line:

    {"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"}
    {"prompt": [messages], "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}

Every record is checked before anything is tokenized or trained, and an error names the file, the line and
the field. A `val_frac` share of the pairs (a seeded shuffle) is held out. `--task add:digits=D` instead
generates `--pairs` pairs from the add task's train split (chosen: the right sum; rejected: a corrupted one)
and holds out pairs on its test split, problems never trained on.

`key=value` sets `RMConfig` fields (lr, batch_size, center_rewards_coefficient, pool=eos|answer, ...).
RUN receives metrics.jsonl (per step: loss, accuracy, margin, lr, grad_norm; per evaluation: val_loss,
val_accuracy), rm_config.json, the reward model (model/, reward_head.safetensors, reward_model.json) and
summary.json with the held-out pairwise accuracy before and after training, also printed as the last line
(JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv3.checkpoint import from_pretrained, resolve_model_dir
from dsv3.config import TrainConfig, coerce_value
from dsv3.cpu import set_expert_backend
from dsv3.io import atomic_write
from dsv3.rl.reward_model import (
    META_FILE,
    POOLS,
    RewardModel,
    add_preference_pairs,
    bradley_terry_loss,
    collate,
    encode_response,
    save_reward_model,
)
from dsv3.tasks import get_task
from dsv3.tokenizer import Tokenizer
from dsv3.train.metrics import MetricsLog
from dsv3.train.optim import AdamW, clip_grads, grad_norm, param_groups, set_lr
from dsv3.train.schedule import lr_at

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class RMConfig:
    """Reward-model training. LR: linear warmup over warmup_frac, cosine to min_lr_ratio * lr at the end."""

    lr: float = 1e-4
    batch_size: int = 16  # pairs per optimizer step (2 * batch_size sequences)
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_length: int = 1024  # tokens per prompt + response (capped to the model's context)
    center_rewards_coefficient: float = 0.0  # TRL's; 0 = plain Bradley-Terry
    val_frac: float = 0.1  # held-out share of --data pairs
    eval_every: int = 0  # steps; 0 = only before and after training
    pool: str = "eos"  # the hidden state the head reads: "eos" (last token) or "answer" (the one before)
    seed: int = 0

    def validate(self) -> RMConfig:
        for name in ("lr", "weight_decay", "grad_clip", "center_rewards_coefficient"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.seed < 0:
            raise ValueError("eval_every and seed must be >= 0")
        for name in ("warmup_frac", "min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1 + (name == "min_lr_ratio"):
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if not 0 < self.val_frac < 1:
            raise ValueError(f"val_frac must be in (0, 1), got {self.val_frac}")
        return self

    def with_overrides(self, pairs: list[str]) -> RMConfig:
        """`key=value` strings applied to the fields; ValueError names a bad key or value."""
        names = {f.name for f in dataclasses.fields(self)}
        kw: dict[str, Any] = {}
        for pair in pairs:
            key, sep, text = pair.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise ValueError(
                    f"unknown setting {pair!r}: expected key=value with key one of {sorted(names)}"
                )
            kw[key] = coerce_value(getattr(self, key), text, key)
        return dataclasses.replace(self, **kw).validate()


# ------------------------------------------------------------------------------------------ data
class PreferenceDataError(ValueError):
    """A bad preference record: the message names the file, line and field."""


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_messages(msgs: Any, field: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise PreferenceDataError(
            f"{field}: expected a string or a non-empty list of messages, got {_type(msgs)}"
        )
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise PreferenceDataError(
                f"{field}[{i}]: expected an object with role and content, got {_type(m)}"
            )
        if m.get("role") not in ROLES:
            raise PreferenceDataError(
                f"{field}[{i}].role: expected one of {list(ROLES)}, got {m.get('role')!r}"
            )
        if not isinstance(m.get("content"), str):
            raise PreferenceDataError(
                f"{field}[{i}].content: expected a string, got {_type(m.get('content'))}"
            )


def check_record(obj: Any) -> None:
    """Raise PreferenceDataError (naming the field) unless obj is a {"prompt", "chosen", "rejected"} pair."""
    if not isinstance(obj, dict):
        raise PreferenceDataError(f"expected a JSON object, got {_type(obj)}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise PreferenceDataError(f"{key}: missing (a preference record has prompt, chosen and rejected)")
    if isinstance(obj["prompt"], str):
        if not obj["prompt"]:
            raise PreferenceDataError("prompt: empty string")
    else:
        _check_messages(obj["prompt"], "prompt")
    for key in ("chosen", "rejected"):
        v = obj[key]
        if isinstance(v, str):
            if not v:
                raise PreferenceDataError(f"{key}: empty string")
            continue
        _check_messages(v, key)
        if len(v) != 1 or v[0]["role"] != "assistant":
            raise PreferenceDataError(f"{key}: expected a string or a list of one assistant message")
    if obj["chosen"] == obj["rejected"]:
        raise PreferenceDataError("chosen and rejected are identical: no preference to learn")


def read_preferences(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a .jsonl file (or a directory of them, sorted), validated; each gets a "source"
    ("file:line"). Raises PreferenceDataError at the first bad one."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*.jsonl") if f.is_file()) if p.is_dir() else [p]
    if not p.exists() or not files:
        raise PreferenceDataError(f"{p}: no such file, or no .jsonl files in this directory")
    records = []
    for f in files:
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PreferenceDataError(f"{f}: cannot read: {e}") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{f}:{n}: invalid JSON: {e.msg} at column {e.colno}") from None
            try:
                check_record(obj)
            except PreferenceDataError as e:
                raise PreferenceDataError(f"{f}:{n}: {e}") from None
            records.append({**obj, "source": f"{f}:{n}"})
    if not records:
        raise PreferenceDataError(f"{p}: no records")
    return records


def split_records(records: list[dict[str, Any]], val_frac: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, at least one pair on each side."""
    if len(records) < 2:
        raise ValueError(
            f"need at least 2 preference pairs (one to train, one to hold out), got {len(records)}"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = min(max(1, round(val_frac * len(records))), len(records) - 1)
    return [records[i] for i in order[k:]], [records[i] for i in order[:k]]


def tokenize_pairs(records: list[dict[str, Any]], tokenizer: Tokenizer, max_length: int) -> list[tuple]:
    """(chosen ids, rejected ids) per record; a template failure names the record's file:line."""
    out = []
    for r in records:
        try:
            out.append(
                tuple(
                    encode_response(tokenizer, r["prompt"], r[k], max_length) for k in ("chosen", "rejected")
                )
            )
        except ValueError as e:
            raise PreferenceDataError(f"{r.get('source', 'record')}: {e}") from None
    return out


# ------------------------------------------------------------------------------------------ training
@torch.no_grad()
def evaluate_pairs(model: RewardModel, pairs: list[tuple], cfg: RMConfig, pad_id: int) -> dict[str, float]:
    """Held-out Bradley-Terry loss and pairwise accuracy (share of pairs with r(chosen) > r(rejected))."""
    chosen = torch.tensor(model.score_ids([c for c, _ in pairs], 2 * cfg.batch_size, pad_id))
    rejected = torch.tensor(model.score_ids([r for _, r in pairs], 2 * cfg.batch_size, pad_id))
    loss, stats = bradley_terry_loss(chosen, rejected, cfg.center_rewards_coefficient)
    return {"val_loss": float(loss), "val_accuracy": stats["accuracy"], "val_margin": stats["margin"]}


def train_reward_model(
    model: RewardModel,
    train: list[tuple],
    held_out: list[tuple],
    cfg: RMConfig,
    steps: int,
    metrics: MetricsLog,
    pad_id: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """AdamW on the Bradley-Terry loss over shuffled epochs of `train`; returns the summary."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    opt = AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
    )
    sched = TrainConfig(
        steps=steps, lr=cfg.lr, warmup_frac=cfg.warmup_frac, decay_start_frac=cfg.warmup_frac,
        decay_end_frac=1.0, min_lr_ratio=cfg.min_lr_ratio, final_frac=0.0,
    )  # fmt: skip
    before = evaluate_pairs(model, held_out, cfg, pad_id)
    metrics.write({"type": "eval", "step": 0, **before})
    order: list[int] = []
    start = time.perf_counter()
    model.train()
    every = max(1, steps // 10)
    for step in range(steps):
        batch = []
        while len(batch) < min(cfg.batch_size, len(train)):
            if not order:
                order = list(range(len(train)))
                rng.shuffle(order)
            batch.append(train[order.pop()])
        ids, mask = collate([c for c, _ in batch] + [r for _, r in batch], pad_id)
        rewards = model(ids, mask)
        loss, stats = bradley_terry_loss(
            rewards[: len(batch)], rewards[len(batch) :], cfg.center_rewards_coefficient
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = grad_norm(params)
        if cfg.grad_clip > 0:
            clip_grads(params, cfg.grad_clip, norm)
        lr = lr_at(sched, step)
        set_lr(opt, lr)
        opt.step()
        rec = {
            "type": "train",
            "step": step + 1,
            "loss": loss.detach().item(),
            **stats,
            "lr": lr,
            "grad_norm": float(norm),
        }
        metrics.write(rec)
        if progress and ((step + 1) % every == 0 or step + 1 == steps):
            print(
                f"rm step {step + 1}/{steps}: loss {rec['loss']:.4f} accuracy {stats['accuracy']:.3f}",
                flush=True,
            )
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
            metrics.write({"type": "eval", "step": step + 1, **evaluate_pairs(model, held_out, cfg, pad_id)})
            model.train()
    seconds = time.perf_counter() - start
    after = evaluate_pairs(model, held_out, cfg, pad_id)
    metrics.write({"type": "eval", "step": steps, **after})
    model.eval()
    return {
        "held_out_accuracy": after["val_accuracy"],
        "held_out_loss": after["val_loss"],
        "held_out_accuracy_before": before["val_accuracy"],
        "held_out_pairs": len(held_out),
        "train_pairs": len(train),
        "steps": steps,
        "train_seconds": round(seconds, 3),
    }


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="src", required=True, help="run directory or HF model directory")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help='preference JSONL (file or directory): {"prompt", "chosen", "rejected"}')
    data.add_argument("--task", help="generate pairs from a task: add or add:digits=D (correct vs corrupted)")
    parser.add_argument("--pairs", type=int, default=2000, help="with --task: training pairs (default 2000)")
    parser.add_argument("--held-out", type=int, default=200, help="with --task: held-out pairs (default 200)")
    parser.add_argument("--out", required=True, help="run directory for the reward model")
    parser.add_argument(
        "--epochs", type=float, default=1.0, help="passes over the training pairs (default 1)"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a reward model in --out")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="RMConfig settings (lr, batch_size, ...)"
    )


def _task_records(spec: str, n_train: int, n_held: int, seed: int) -> tuple[list, list]:
    task = get_task(spec)
    if task.name != "add":
        raise ValueError(f"--task: preference pairs are generated for the add task only, got {task.name!r}")
    digits = task.digits  # type: ignore[attr-defined]
    if n_train < 1 or n_held < 1:
        raise ValueError("--pairs and --held-out must be >= 1")
    return (
        add_preference_pairs(n_train, digits, "train", seed),
        add_preference_pairs(n_held, digits, "test", seed),
    )


def run(args: argparse.Namespace) -> int:
    cfg = RMConfig().with_overrides(args.overrides)
    out = Path(args.out)
    if (out / META_FILE).exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a reward model (pass --overwrite to replace it)")
    src = resolve_model_dir(args.src)
    if args.data is not None:
        train_recs, held_recs = split_records(read_preferences(args.data), cfg.val_frac, cfg.seed)
    else:
        train_recs, held_recs = _task_records(args.task, args.pairs, args.held_out, cfg.seed)
    tokenizer = Tokenizer.from_file(src / "tokenizer.json")
    backbone = from_pretrained(src, dtype=torch.float32)
    max_length = min(cfg.max_length, backbone.config.max_position_embeddings)
    train, held_out = (
        tokenize_pairs(train_recs, tokenizer, max_length),
        tokenize_pairs(held_recs, tokenizer, max_length),
    )
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    steps = args.steps if args.steps is not None else max(1, round(args.epochs * per_epoch))
    if steps <= 0:
        raise ValueError(f"--steps must be positive, got {steps}")
    print(
        f"rm: {len(train):,} training pairs, {len(held_out):,} held out; "
        f"{steps} steps of {cfg.batch_size} pairs",
        flush=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    run_info = {
        "rm": dataclasses.asdict(cfg),
        "from": str(src),
        "data": args.data,
        "task": args.task,
        "steps": steps,
    }
    atomic_write(out / "rm_config.json", (json.dumps(run_info, indent=2) + "\n").encode())
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    set_expert_backend(backbone, "padded")  # the trainer's CPU expert layout: same numbers, faster
    model = RewardModel(backbone, cfg.pool)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    summary = train_reward_model(
        model, train, held_out, cfg, steps, MetricsLog(metrics_path), pad_id, progress=not args.no_progress
    )
    save_reward_model(model, tokenizer, out, extra={"max_length": max_length, "from": str(src)})
    summary = {"run": str(out), **summary}
    atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    acc, acc0 = summary["held_out_accuracy"], summary["held_out_accuracy_before"]
    print(f"rm: held-out pairwise accuracy {acc:.3f} (before training {acc0:.3f}) on {len(held_out)} pairs")
    print(json.dumps(summary), flush=True)
    return 0
