"""Supervised fine-tuning (report §5.1): chat data packed with sample masking, on the pre-training loop.

`dsv3 sft --from SRC --data FILE --out RUN` starts from a run directory or an HF model directory (its
weights, config and tokenizer), reads SFT data in TRL's formats (`dsv3.train.sft_data`), tokenizes it
through the model's chat template with the loss on assistant tokens only (`loss_on=all` for every
token), packs samples best-fit-decreasing into `seq_len` rows and trains on them with the same
`Trainer` as pre-training (plans, checkpoints and exact resume, NaN guard, metrics, progress bar).

Sample masking: each packed row carries segment ids and positions restarting at 0 per sample; the model
attends block-diagonally (`dsv3.model.sample_mask`), so the samples of a row are mutually invisible and
its loss and gradients equal those of its samples run one by one (tests/unit/test_model.py). The labels
of a sample's last token and of masked (prompt) tokens are -100. MTP is off in SFT (its shifted inputs
would cross sample boundaries); the paper's recipe is the default shape: 2 epochs, cosine decay to 1/5
of the peak LR (5e-6 -> 1e-6 at V3's scale).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsv3.checkpoint.hf import read_hf_config
from dsv3.config import ModelConfig, TrainConfig
from dsv3.model import IGNORE_INDEX
from dsv3.tokenizer import Tokenizer
from dsv3.train.data import DataState, eval_windows
from dsv3.train.setup import TrainData
from dsv3.train.sft_data import PAD_SEGMENT, load_sft_data, pack, stack_rows

# The paper's SFT shape (report §5.1), applied unless the user sets these keys.
SFT_DEFAULTS = {
    "lr": 5e-5,
    "warmup_frac": 0.03,
    "decay_start_frac": 0.03,
    "decay_end_frac": 1.0,
    "final_frac": 0.0,
    "min_lr_ratio": 0.2,
    "batch_ramp_start": 1.0,
    "mtp_weight": 0.0,
    "mtp_weight_final": 0.0,
    "dropout": 0.0,
    "fim_rate": 0.0,
    "eval_every": 0,
    "batch_size": 8,
}


class PackedSFTStream:
    """Deterministic, resumable stream of packed SFT rows: (input_ids, labels, positions, segment_ids),
    each int64 [b, T]; the rows of an epoch in a seeded permutation, as `PackedDataset` does."""

    def __init__(self, rows: dict[str, np.ndarray], seed: int = 0):
        n = len(rows["input_ids"])
        if n == 0:
            raise ValueError("the SFT data packs into no rows")
        self.rows, self.seed, self.n = rows, seed, n
        self.state = DataState()

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_batch(
        self, batch_size: int, rank: int = 0, world: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by the data-parallel world {world}")
        picked = []
        for k in range(batch_size):
            if self.state.cursor >= self.n:
                self.state = DataState(self.state.epoch + 1, 0)
            if k % world == rank:
                picked.append(int(self.order(self.state.epoch)[self.state.cursor]))
            self.state.cursor += 1
        idx = np.asarray(picked)
        keys = ("input_ids", "labels", "positions", "segment_ids")
        x, y, pos, seg = (torch.from_numpy(self.rows[k][idx]) for k in keys)
        return x, y, pos, seg

    def state_dict(self) -> dict[str, int]:
        return self.state.to_dict()

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.state = DataState(int(d["epoch"]), int(d["cursor"]))


def rows_digest(rows: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(rows):
        h.update(k.encode())
        h.update(np.ascontiguousarray(rows[k]).tobytes())
    return h.hexdigest()[:16]


def sft_steps(n_rows: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps for `epochs` passes over n_rows packed rows (at least 1)."""
    return max(1, math.ceil(n_rows * epochs / batch_size))


def sft_train_data(
    rows: dict[str, np.ndarray],
    val_ids: list[list[int]],
    tokenizer: Tokenizer,
    texts: tuple[list[str], list[str]],
    cfg: TrainConfig,
) -> TrainData:
    """The trainer's data for SFT: the packed stream, validation windows over the held-out samples'
    tokens (every token scored), and the rendered texts (for the byte bigram the trainer reports)."""
    flat = np.asarray([t for ids in val_ids for t in ids], dtype=np.int64)
    T = cfg.seq_len
    if len(flat) < T + 1:  # a short held-out set still gives one (wrapped) window
        flat = np.resize(flat, T + 1) if len(flat) else np.zeros(T + 1, dtype=np.int64)
    return TrainData(
        tokenizer=tokenizer,
        train=PackedSFTStream(rows, cfg.seed),
        val_windows=eval_windows(flat, T),
        digest=rows_digest(rows),
        train_docs=texts[0],
        val_docs=texts[1],
    )


@dataclass
class SFTData:
    """Packed SFT data with the counts `dsv3 sft` reports."""

    train_data: TrainData
    samples: int
    held_out: int
    rows: int
    fill: float  # share of row positions holding sample tokens
    loss_tokens: int


def prepare_sft_data(
    path: str | Path,
    tokenizer: Tokenizer,
    cfg: TrainConfig,
    loss_on: str = "completion",
    val_frac: float = 0.05,
) -> SFTData:
    """Read, validate and tokenize the SFT data (`sft_data.load_sft_data`), hold out `val_frac` of the
    samples (a seeded choice), pack the rest into `cfg.seq_len` rows: the trainer's data."""
    if not 0 <= val_frac < 1:
        raise ValueError(f"val_frac must be in [0, 1), got {val_frac}")
    samples = load_sft_data(path, tokenizer, loss_on)
    if not samples:
        raise ValueError(f"{path}: no SFT records")
    n_val = int(len(samples) * val_frac) if len(samples) >= 20 else 0
    order = np.random.default_rng(cfg.seed).permutation(len(samples))
    val = [samples[i] for i in sorted(order[:n_val])]
    train = [samples[i] for i in sorted(order[n_val:])]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    rows = dict(stack_rows(pack(train, cfg.seq_len, pad)))
    texts = ([tokenizer.decode(s.input_ids) for s in train], [tokenizer.decode(s.input_ids) for s in val])
    val_ids = [s.input_ids for s in (val or train[:1])]
    return SFTData(
        train_data=sft_train_data(rows, val_ids, tokenizer, texts, cfg),
        samples=len(samples),
        held_out=len(val),
        rows=len(rows["input_ids"]),
        fill=float((rows["segment_ids"] != PAD_SEGMENT).mean()),
        loss_tokens=int((rows["labels"] != IGNORE_INDEX).sum()),
    )


def model_config_of(model_dir: Path) -> ModelConfig:
    """The ModelConfig of an HF model directory (its config.json)."""
    return ModelConfig.from_hf(read_hf_config(model_dir))
