"""Long-context extension (DeepSeek-V3 report §4.3): continue a trained run with YaRN at a longer length.

V3 pre-trains at 4K tokens, then runs two extension stages, 4K -> 32K and 32K -> 128K, 1000 steps each,
with YaRN on the decoupled rope key only (scale s = 40, beta_fast = 32, beta_slow = 1, attention scale
sqrt(t) = 0.1 ln s + 1, carried as mscale = mscale_all_dim = 1: cos/sin unscaled, softmax scale * t),
a constant LR of 7.3e-6 and batches of 1920 x 32K, then 480 x 128K tokens.

Here (`dsv3 train --from RUN --extend-context FACTOR`), scaled to the source run:
- rope scaling: YaRN relative to the *pre-training* length. A source without YaRN gives
  original_max_position_embeddings = its training seq_len (train_config.json) and factor = FACTOR; a
  source already extended keeps its original length and multiplies its factor (two stages chain: 256 ->
  x4 -> x16 ends with factor 16 over 256, as V3's one s = 40 config covers both of its stages).
  max_position_embeddings = original * factor.
- betas: V3's (32 / 1) unless `--yarn-beta-fast B`. beta_fast = 32 keeps the frequency of the rope
  dimensions whose wavelength is under original / 32 tokens: 128 tokens at V3's 4K, but 8 at a 256-token
  toy run, where nearly every dimension is then interpolated and the local (previous-token) attention
  that retrieval rests on breaks; B = 4 keeps wavelengths under 64 tokens there (BENCHMARKS.md).
- seq_len: the source's training length * FACTOR unless --seq-len (at most max_position_embeddings).
- batch: the source's tokens per step kept (V3: 15360 x 4K ~ 1920 x 32K ~ 480 x 128K), so
  batch_size = max(1, source batch * source seq_len // seq_len).
- LR: constant (no warmup, no decay) at the LR the source run ended with (its schedule at its last step:
  lr * final_lr_ratio after pre-training, lr * min_lr_ratio after `dsv3 sft`); V3's 7.3e-6 is exactly
  its pre-training's final LR (7.3e-6 = 2.2e-4 * 0.0332). `lr=...` overrides it.
- steps: V3's 1000 steps are 0.4% of its pre-training steps, which is a handful at toy scale; the
  default is 10% of the source run's steps (at least 1). `--steps` overrides it.
- MTP weight: the source's value at its last step (0 after `dsv3 sft`, which trains no MTP); the other
  settings (dropout, balance, data split) as the source.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.checkpoint.hf import resolve_model_dir
from dsv3.config import ModelConfig, TrainConfig
from dsv3.tokenizer import Tokenizer
from dsv3.train.schedule import lr_at, mtp_weight_at
from dsv3.train.setup import prepare_run_dir
from dsv3.train.sft import model_config_of

# DeepSeek-V3's config.json rope_scaling, less factor and original length (set per stage)
YARN_V3: dict[str, Any] = {
    "type": "yarn",
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
STEPS_FRACTION = 0.1  # default stage length: this share of the source run's steps


@dataclass
class Extension:
    """What an extension stage starts from and trains with."""

    source: Path  # the source's HF model directory (weights, config.json, tokenizer)
    model: ModelConfig  # the source's model with YaRN rope scaling and the raised context
    train: TrainConfig  # the stage's schedule, init_from = source
    data: str | None  # the source run's corpus (None = the bundled one)


def source_train_info(src: str | Path) -> dict[str, Any]:
    """The source run's train_config.json (RUN/train_config.json, or beside an HF dir RUN/model)."""
    p = Path(src)
    for cand in (p / "train_config.json", p.parent / "train_config.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {cand}: {e}") from None
    raise ValueError(
        f"{p}: no train_config.json (the source of --extend-context must be a dsv3 run directory, "
        "whose training length sets YaRN's original_max_position_embeddings)"
    )


def yarn_model(
    model: ModelConfig, trained_len: int, factor: float, beta_fast: float | None = None
) -> ModelConfig:
    """`model` with YaRN rope scaling extending a model trained at `trained_len` tokens by `factor`; a
    model already under YaRN keeps its original length and its betas and multiplies its factor.

    The betas are V3's (32 / 1) or the source's, beta_fast set by `beta_fast`: rope dimensions that turn
    more than beta_fast times over the original length keep their frequency, those that turn fewer than
    beta_slow times are interpolated by the factor, a linear ramp between."""
    if not factor > 1:
        raise ValueError(f"--extend-context must be > 1, got {factor}")
    betas = {k: YARN_V3[k] for k in ("beta_fast", "beta_slow")}
    if model.rope_type == "yarn":
        rs = model.rope_scaling or {}
        original, total = int(rs["original_max_position_embeddings"]), float(rs["factor"]) * factor
        betas = {k: rs.get(k, v) for k, v in betas.items()}
    elif model.rope_type == "default":
        original, total = trained_len, float(factor)
    else:
        raise ValueError(
            f"cannot extend a model with rope_scaling type {model.rope_type!r} (only none or yarn)"
        )
    if beta_fast is not None:
        betas["beta_fast"] = beta_fast
    if not 0 < betas["beta_slow"] <= betas["beta_fast"]:
        raise ValueError(
            f"YaRN betas must satisfy 0 < beta_slow <= beta_fast, got beta_slow={betas['beta_slow']} "
            f"beta_fast={betas['beta_fast']}"
        )
    scaling = {**YARN_V3, **betas, "factor": total, "original_max_position_embeddings": original}
    max_pos = int(math.ceil(original * total))
    return dataclasses.replace(model, rope_scaling=scaling, max_position_embeddings=max_pos).validate()


def extension(
    src: str | Path,
    factor: float,
    seq_len: int | None = None,
    steps: int | None = None,
    beta_fast: float | None = None,
) -> Extension:
    """The configs of one extension stage from run directory `src` (see the module docstring)."""
    source = resolve_model_dir(src)
    info = source_train_info(src)
    base = TrainConfig.from_dict(info["train"])
    model = yarn_model(model_config_of(source), base.seq_len, factor, beta_fast=beta_fast)
    new_len = seq_len if seq_len is not None else int(base.seq_len * factor)
    if new_len > model.max_position_embeddings:
        raise ValueError(
            f"--seq-len {new_len} is longer than the extended context {model.max_position_embeddings}"
        )
    n = steps if steps is not None else max(1, round(base.steps * STEPS_FRACTION))
    train = dataclasses.replace(
        base,
        seq_len=new_len,
        batch_size=max(1, base.batch_size * base.seq_len // new_len),
        micro_batch_size=None,
        steps=n,
        lr=lr_at(base, base.steps - 1),
        warmup_frac=0.0,
        decay_start_frac=1.0,
        decay_end_frac=1.0,
        final_frac=0.0,
        batch_ramp_start=1.0,
        mtp_weight=mtp_weight_at(base, base.steps - 1),
        mtp_switch_frac=0.0,
        bias_update_off_frac=0.0,
        eval_every=0,
        ckpt_every=0,
        init_from=str(source),
    ).validate(model)
    data = info.get("data")
    return Extension(source, model, train, None if data in (None, "bundled:tinyshakespeare") else data)


def prepare_extension_dir(ext: Extension, out: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Before the trainer (and before any rank is spawned): check/clear OUT as `dsv3 train` does and put
    the source's tokenizer in OUT/tokenizer, so the stage tokenizes with the source's vocabulary."""
    out = Path(out)
    prepare_run_dir(out, resume=resume, overwrite=overwrite, is_main=True, barrier=lambda: None)
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(ext.source)
        tok.save(out / "tokenizer", model_max_length=ext.model.max_position_embeddings)
