"""`dsv3 train` (and `python -m dsv3.train`): train a preset on a corpus, resumably.

    dsv3 train --preset tiny [--data PATH] [--out RUN_DIR] [--steps N] [--stop-at K] [--resume]
               [--overwrite] [--fp8] [--nproc N] [--rank-timeout S] [key=value ...]
    dsv3 train --from RUN --extend-context FACTOR [--seq-len L] [--steps N] --out RUN2 [key=value ...]

The second form is a long-context extension stage (dsv3.train.extend): RUN's weights continued with YaRN
rope scaling at FACTOR times its training length, on its corpus and tokenizer, with a constant LR (the
source's final LR) and its tokens per step; run it again on RUN2 for a second stage. `key=value` settings
apply on top of the stage's defaults; --preset is not used.

Options and `key=value` settings may come in any order (`--nproc 2 ep=2 --steps 400 ckpt_every=0`).
SIGTERM or Ctrl-C stops the run after the step in progress with a checkpoint (on every rank; `--nproc`
forwards it), exit code 143 (dsv3.parallel.launch.PREEMPTED_EXIT_CODE); `--resume` continues it.

`key=value` sets a train field (see dsv3.config.TrainConfig), a model field (ModelConfig) or a field of the
parallel layout (ParallelConfig: ep, dp, pp, pp_schedule, fp8, ...); `model.key`, `train.key` or
`parallel.key` picks one explicitly. Every override is checked, with both configs validated, before
anything is trained: an unknown key or a bad value is an error naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from dsv3.config import ModelConfig, ParallelConfig, TrainConfig, coerce_value, load_preset
from dsv3.runtime import tune_malloc


def apply_overrides(
    model: ModelConfig, train: TrainConfig, pairs: list[str]
) -> tuple[ModelConfig, TrainConfig]:
    """Apply `key=value` strings to the configs (a parallel-layout key sets `train.parallel`); ValueError
    names a bad key or value."""
    fields = {
        "model": {f.name for f in dataclasses.fields(ModelConfig)},
        "train": {f.name for f in dataclasses.fields(TrainConfig)} - {"parallel"},
        "parallel": {f.name for f in dataclasses.fields(ParallelConfig)},
    }
    targets: dict[str, Any] = {"model": model, "train": train, "parallel": train.parallel}
    kw: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "parallel": {}}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        scope, _, name = key.rpartition(".")
        scope = "parallel" if scope == "train.parallel" else scope
        if scope not in ("", *fields):
            raise ValueError(f"unknown key {key!r}: the prefix must be 'model.', 'train.' or 'parallel.'")
        found = [s for s in fields if name in fields[s] and scope in ("", s)]
        if not found:
            where = scope or "model, train or parallel"
            raise ValueError(f"unknown key {key!r}: not a {where} setting")
        if len(found) > 1:
            raise ValueError(f"ambiguous key {key!r}: write {' or '.join(f'{s}.{name}' for s in found)}")
        kw[found[0]][name] = coerce_value(getattr(targets[found[0]], name), text, key)
    try:
        model = dataclasses.replace(model, **kw["model"]).validate()
        parallel = dataclasses.replace(train.parallel, **kw["parallel"])
        train = dataclasses.replace(train, **kw["train"], parallel=parallel).validate(model)
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
    _add_options(parser)
    # REMAINDER: settings may be followed by more options; `split_overrides` sorts them out
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, metavar="key=value", help="model or train setting overrides"
    )


def split_overrides(args: argparse.Namespace) -> argparse.Namespace:
    """Options that came after the first `key=value` (argparse stops at it) parsed into `args`; what is
    left must be `key=value` settings. ValueError for anything else."""
    if not any(a.startswith("-") for a in args.overrides):
        return args
    parser = argparse.ArgumentParser(prog="dsv3 train", add_help=False, exit_on_error=False)
    _add_options(parser)
    try:
        _, rest = parser.parse_known_args(args.overrides, namespace=args)
    except argparse.ArgumentError as e:
        raise ValueError(str(e)) from None
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    if bad:
        raise ValueError(f"unrecognized arguments: {' '.join(bad)} (options are --name, settings key=value)")
    args.overrides = rest
    return args


def _add_options(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--fp8", action="store_true", help="FP8 GEMMs (the same as fp8=true)")
    parser.add_argument(
        "--from", dest="src", default=None, help="a run directory to extend (with --extend-context)"
    )
    parser.add_argument(
        "--extend-context",
        type=float,
        default=None,
        metavar="FACTOR",
        help="long-context stage: YaRN over FACTOR x the source's training length (dsv3.train.extend)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="the stage's sequence length (default: FACTOR x the source's)",
    )
    parser.add_argument(
        "--yarn-beta-fast",
        type=float,
        default=None,
        metavar="B",
        help="YaRN's beta_fast for the stage (default V3's 32, or the source's when it has YaRN): rope "
        "dimensions turning more than B times over the training length keep their frequency",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-sample", action="store_true", help="skip the text sample at the end")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="local ranks for expert/data/pipeline parallelism (gloo/NCCL; layout from pp/dp/ep/nodes); "
        "leave out under torchrun",
    )
    parser.add_argument(
        "--rank-timeout",
        type=float,
        default=30.0,
        help="seconds without a heartbeat after which a rank counts as frozen and the job stops, naming "
        "it (default 30)",
    )


def _extension_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """--from/--extend-context: the stage's configs with the `key=value` overrides; OUT prepared (cleared
    on --overwrite, the source's tokenizer copied) before any rank starts."""
    from dsv3.train.extend import extension, prepare_extension_dir

    if args.src is None or args.extend_context is None:
        raise ValueError("--from and --extend-context go together (a long-context extension stage)")
    if args.out is None:
        raise ValueError("--extend-context needs --out (the stage's own run directory)")
    ext = extension(
        args.src, args.extend_context, seq_len=args.seq_len, steps=args.steps, beta_fast=args.yarn_beta_fast
    )
    model_cfg, train_cfg = apply_overrides(ext.model, ext.train, args.overrides)
    if args.data is None:
        args.data = ext.data
    prepare_extension_dir(ext, args.out, resume=args.resume, overwrite=args.overwrite)
    args.overwrite = False  # cleared above, with the tokenizer now in place
    return model_cfg, train_cfg


def run(args: argparse.Namespace) -> int:
    from dsv3.parallel.launch import PREEMPTED_EXIT_CODE
    from dsv3.train.distributed import make_trainer, maybe_spawn, with_fp8
    from dsv3.train.trainer import TrainingDiverged

    args = split_overrides(args)
    if not args.rank_timeout > 0:
        raise ValueError(f"--rank-timeout must be > 0 seconds, got {args.rank_timeout}")
    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if args.src is not None or args.extend_context is not None:
        model_cfg, train_cfg = _extension_configs(args)
    else:
        if args.seq_len is not None:
            raise ValueError("--seq-len goes with --extend-context (elsewhere write seq_len=L)")
        if args.yarn_beta_fast is not None:
            raise ValueError("--yarn-beta-fast goes with --extend-context")
        model_cfg, train_cfg = build_configs(args.preset, args.overrides, args.steps)
    train_cfg = with_fp8(train_cfg, args.fp8)  # the flag is `fp8=true`'s short form
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
        progress=not args.no_progress,
        rank_timeout_s=args.rank_timeout,
    )
    try:
        summary = trainer.fit(stop_at=args.stop_at)
    except TrainingDiverged as e:
        print(f"dsv3 train: {e}", file=sys.stderr)
        return 1
    if summary.get("preempted"):
        return PREEMPTED_EXIT_CODE
    if summary["step"] >= train_cfg.steps and not args.no_sample and train_cfg.sample_tokens:
        text = trainer.sample("\n")  # every rank: expert-parallel forwards need them all
        if trainer.plan.is_main:
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
