"""`dsv3 sft`: supervised fine-tuning of a trained model on chat data (dsv3.train.sft).

    dsv3 sft --from SRC --data FILE --out RUN [--epochs E] [--steps N] [--stop-at K] [--resume]
             [--overwrite] [--fp8] [--nproc N] [key=value ...]

SRC is a run directory or an HF model directory (weights, config.json, tokenizer). FILE is JSONL (or a
directory of it) in TRL's formats: {"messages": [...]}, {"prompt": ..., "completion": ...}, {"text": ...}.
`key=value` sets train or layout fields as in `dsv3 train` (lr, seq_len, batch_size, loss_on is a flag
here: --loss-on all); the SFT recipe's defaults (`SFT_DEFAULTS`) apply to keys not given.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from dsv3.checkpoint.hf import resolve_model_dir
from dsv3.config import TrainConfig
from dsv3.tokenizer import Tokenizer
from dsv3.train.cli import apply_overrides
from dsv3.train.distributed import make_trainer, maybe_spawn, with_fp8
from dsv3.train.sft import SFT_DEFAULTS, model_config_of, prepare_sft_data, sft_steps
from dsv3.train.trainer import TrainingDiverged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="src", required=True, help="run directory or HF model directory")
    parser.add_argument("--data", required=True, help="SFT data: JSONL file or directory (TRL formats)")
    parser.add_argument("--out", required=True, help="run directory for the fine-tuned model")
    parser.add_argument("--epochs", type=float, default=2.0, help="passes over the data (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--loss-on", choices=("completion", "all"), default="completion")
    parser.add_argument("--val-frac", type=float, default=0.05, help="held-out share of the samples")
    parser.add_argument("--stop-at", type=int, default=None, help="end after step K with a checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over in a run directory")
    parser.add_argument("--fp8", action="store_true", help="FP8 GEMMs (fp8=true)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--nproc", type=int, default=1, help="local data-parallel ranks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="train or layout settings")


def run(args: argparse.Namespace) -> int:
    src = resolve_model_dir(args.src)
    tokenizer = Tokenizer.from_file(src / "tokenizer.json")
    model_cfg = model_config_of(src)
    seq_len = min(4096, model_cfg.max_position_embeddings)  # default: the model's context, at most 4K
    base = TrainConfig(**SFT_DEFAULTS, seq_len=seq_len, init_from=str(src))
    model_cfg, train_cfg = apply_overrides(model_cfg, base, args.overrides)
    train_cfg = with_fp8(train_cfg, args.fp8)
    data = prepare_sft_data(args.data, tokenizer, train_cfg, loss_on=args.loss_on, val_frac=args.val_frac)
    steps = args.steps if args.steps is not None else sft_steps(data.rows, train_cfg.batch_size, args.epochs)
    if steps <= 0:
        raise ValueError(f"--steps must be positive, got {steps}")
    train_cfg = dataclasses.replace(train_cfg, steps=steps).validate()
    if args.stop_at is not None and not 0 < args.stop_at <= steps:
        raise ValueError(f"--stop-at must be in [1, steps={steps}], got {args.stop_at}")
    spawned = maybe_spawn(args, model_cfg, train_cfg, target="dsv3.train.sft_cli:run")
    if spawned is not None:
        return spawned
    print(
        f"sft: {data.samples:,} samples ({data.held_out:,} held out) packed into {data.rows:,} rows of "
        f"{train_cfg.seq_len} tokens ({data.fill:.0%} filled), {data.loss_tokens:,} loss tokens; "
        f"{steps} steps of {train_cfg.batch_size} rows",
        flush=True,
    )
    trainer = make_trainer(
        model_cfg,
        train_cfg,
        args.out,
        data=args.data,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        train_data=data.train_data,
    )
    try:
        trainer.fit(stop_at=args.stop_at)
    except TrainingDiverged as e:
        print(f"dsv3 sft: {e}", file=sys.stderr)
        return 3
    return 0
