"""`dsv3 train` (and `python -m dsv3.train`): train a preset on a corpus, resumably.

    dsv3 train --preset tiny [--data PATH] [--out RUN_DIR] [--steps N] [--stop-at K] [--resume]
               [--overwrite] [--fp8] [key=value ...]

`key=value` sets a train field (see dsv3.config.TrainConfig) or a model field (ModelConfig); `model.key`
or `train.key` picks one explicitly. Every override is checked, with both configs validated, before
anything is trained: an unknown key or a bad value is an error naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from dsv3.config import ModelConfig, TrainConfig, coerce_value, load_preset
from dsv3.runtime import tune_malloc


def apply_overrides(
    model: ModelConfig, train: TrainConfig, pairs: list[str]
) -> tuple[ModelConfig, TrainConfig]:
    """Apply `key=value` strings to the two configs; ValueError names a bad key or value."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    m_kw: dict[str, Any] = {}
    t_kw: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        scope, _, name = key.rpartition(".")
        if scope not in ("", "model", "train"):
            raise ValueError(f"unknown key {key!r}: the prefix must be 'model.' or 'train.'")
        in_model, in_train = name in model_fields, name in train_fields
        if (
            scope == "model"
            and not in_model
            or scope == "train"
            and not in_train
            or not (in_model or in_train)
        ):
            where = {"model": "model", "train": "train"}.get(scope, "model or train")
            raise ValueError(f"unknown key {key!r}: not a {where} setting")
        if not scope and in_model and in_train:
            raise ValueError(f"ambiguous key {key!r}: write model.{name} or train.{name}")
        target, kw = (model, m_kw) if scope == "model" or (not scope and in_model) else (train, t_kw)
        kw[name] = coerce_value(getattr(target, name), text, key)
    try:
        model = dataclasses.replace(model, **m_kw).validate()
        train = dataclasses.replace(train, **t_kw).validate()
    except TypeError as e:  # a value of the wrong type that validate() trips over
        raise ValueError(f"invalid override: {e}") from None
    return model, train


def build_configs(
    preset: str, overrides: list[str], steps: int | None = None
) -> tuple[ModelConfig, TrainConfig]:
    p = load_preset(preset)
    model = ModelConfig.from_dict(p["model"])
    train = TrainConfig.from_dict(p.get("train", {}))
    if steps is not None:
        overrides = [*overrides, f"train.steps={steps}"]
    return apply_overrides(model, train, overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="model/train preset (default: tiny)")
    parser.add_argument(
        "--data",
        default=None,
        help='a .txt file, a directory of .txt files or a .jsonl file with {"text": ...} lines '
        "(default: the bundled tinyshakespeare)",
    )
    parser.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
    parser.add_argument("--steps", type=int, default=None, help="the run's whole length in optimizer steps")
    parser.add_argument(
        "--stop-at", type=int, default=None, help="end the process after step K with a checkpoint"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in a run directory that holds a run"
    )
    parser.add_argument("--fp8", action="store_true", help="FP8 GEMMs (dsv3.fp8.convert_to_fp8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-sample", action="store_true", help="skip the text sample at the end")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="local ranks for expert/data/pipeline parallelism (gloo/NCCL; layout from pp/dp/ep/nodes); "
        "leave out under torchrun",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="model or train setting overrides")


def run(args: argparse.Namespace) -> int:
    from dsv3.train.distributed import make_trainer, maybe_spawn
    from dsv3.train.trainer import TrainingDiverged

    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    model_cfg, train_cfg = build_configs(args.preset, args.overrides, args.steps)
    if args.stop_at is not None and not 0 < args.stop_at <= train_cfg.steps:
        raise ValueError(f"--stop-at must be in [1, steps={train_cfg.steps}], got {args.stop_at}")
    spawned = maybe_spawn(args, model_cfg, train_cfg)  # --nproc N: start N ranks running this command
    if spawned is not None:
        return spawned
    trainer = make_trainer(  # the distributed trainer under torchrun / as a spawned rank
        model_cfg,
        train_cfg,
        args.out or f"runs/{args.preset}",
        data=args.data,
        resume=args.resume,
        overwrite=args.overwrite,
        fp8=args.fp8,
        progress=not args.no_progress,
    )
    try:
        summary = trainer.fit(stop_at=args.stop_at)
    except TrainingDiverged as e:
        print(f"dsv3 train: {e}", file=sys.stderr)
        return 1
    if summary["step"] >= train_cfg.steps and not args.no_sample and train_cfg.sample_tokens:
        text = trainer.sample("\n")  # every rank: expert-parallel forwards need them all
        if trainer.rank == 0:
            print(f"\n--- sample (prompt: newline) ---\n{text}\n---")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv3.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    tune_malloc()
    try:
        return run(args)
    except ValueError as e:
        print(f"dsv3 train: error: {e}", file=sys.stderr)
        return 2
