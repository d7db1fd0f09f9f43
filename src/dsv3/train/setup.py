"""A run's setup before training: the run directory (new, resumed or overwritten) and its data.

`prepare_run_dir` refuses to start over a run without --overwrite and to resume without a checkpoint.
`load_train_data` reads the corpus, splits it, trains (or reloads) the run's tokenizer and packs the
tokens. Under several ranks the main rank acts and the others wait at `barrier` (a no-op in one
process): the main rank clears the directory and trains the tokenizer, then the others read its file.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsv3.config import ModelConfig, TrainConfig
from dsv3.tokenizer import Tokenizer
from dsv3.train.checkpoint import list_checkpoints
from dsv3.train.data import (
    PackedDataset,
    eval_windows,
    load_corpus,
    split_train_val,
    tokenize_documents,
    tokens_digest,
)

TOKENIZER_TRAIN_CHARS = 50_000_000  # BPE merges are learned from at most this much of the train split


def prepare_run_dir(
    run_dir: Path, *, resume: bool, overwrite: bool, is_main: bool, barrier: Callable[[], None]
) -> None:
    """Check the directory against --resume / --overwrite; with --overwrite the main rank clears it."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other")
    barrier()  # every rank looks at the directory before the main rank changes it
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if resume:
        if not ckpts:
            raise ValueError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    elif ckpts or (run_dir / "metrics.jsonl").exists():
        if not overwrite:
            raise ValueError(
                f"{run_dir} already holds a run: pass --resume to continue it or --overwrite to start over"
            )
        if is_main:
            for sub in ("checkpoints", "model", "tokenizer"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            for f in ("metrics.jsonl", "summary.json"):
                (run_dir / f).unlink(missing_ok=True)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()


@dataclass
class TrainData:
    """The run's tokenizer, packed train stream, validation windows and the text they came from."""

    tokenizer: Tokenizer
    train: PackedDataset
    val_windows: np.ndarray
    digest: str  # of the train tokens: a resume refuses other data or another tokenizer
    train_docs: list[str]
    val_docs: list[str]


def _first_chars(docs: list[str], limit: int) -> list[str]:
    out, n = [], 0
    for d in docs:
        if n >= limit:
            break
        out.append(d[: limit - n])
        n += len(out[-1])
    return out


def load_tokenizer(
    run_dir: Path,
    train_docs: list[str],
    model_config: ModelConfig,
    *,
    is_main: bool,
    log: Callable[[str], None],
) -> Tokenizer:
    """RUN_DIR/tokenizer if present, else byte-level BPE trained on the train split (saved by the main
    rank)."""
    tdir = run_dir / "tokenizer"
    if (tdir / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(tdir)
    else:
        t0 = time.perf_counter()
        tok = Tokenizer.train(_first_chars(train_docs, TOKENIZER_TRAIN_CHARS), model_config.vocab_size)
        if is_main:
            tok.save(tdir, model_max_length=model_config.max_position_embeddings)
        log(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, trained in {time.perf_counter() - t0:.1f}s")
    if tok.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} tokens "
            f"but the model's vocab_size is {model_config.vocab_size}"
        )
    return tok


def load_train_data(
    run_dir: Path,
    data_path: str | Path | None,
    model_config: ModelConfig,
    cfg: TrainConfig,
    *,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = print,
) -> TrainData:
    """Corpus -> split -> tokenizer (the main rank's first, then everyone's) -> packed data."""
    train_docs, val_docs = split_train_val(load_corpus(data_path), cfg.val_frac)
    tok = None
    if is_main:
        tok = load_tokenizer(run_dir, train_docs, model_config, is_main=True, log=log)
    barrier()
    if tok is None:
        tok = load_tokenizer(run_dir, train_docs, model_config, is_main=False, log=log)
    train_tokens = tokenize_documents(tok, train_docs)
    val_tokens = tokenize_documents(tok, val_docs)
    packed = PackedDataset(
        train_tokens,
        cfg.seq_len,
        seed=cfg.seed,
        fim_rate=cfg.fim_rate,
        fim_ids=tok.fim_ids,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
    )
    log(
        f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens "
        f"({sum(len(d.encode()) for d in train_docs) / len(train_tokens):.2f} bytes per token)"
    )
    return TrainData(
        tokenizer=tok,
        train=packed,
        val_windows=eval_windows(val_tokens, cfg.seq_len),
        digest=tokens_digest(train_tokens),
        train_docs=train_docs,
        val_docs=val_docs,
    )
