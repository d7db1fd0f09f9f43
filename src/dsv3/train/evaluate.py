"""Validation loss and bits per byte, and a text sample at the end of a run.

val_bpb = (sum of next-token cross-entropy over the validation targets, in nats) / ln 2 / (UTF-8 bytes
those targets stand for). Bytes, not tokens, make models with different tokenizers comparable (a
character model's bits per character equal bits per byte on ASCII text such as tinyshakespeare).
Special tokens (BOS/EOS between documents) are scored but cover no bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dsv3.model import Transformer
from dsv3.tokenizer import Tokenizer
from dsv3.train.step import autocast_context


@torch.no_grad()
def evaluate(
    model: Transformer,
    windows: np.ndarray,
    token_bytes: Sequence[int],
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean CE (nats/token) and bits per byte over validation windows [n, T+1] (all, or max_batches
    batches of windows spread evenly over the split)."""
    was_training = model.training
    model.eval()
    lengths = torch.as_tensor(np.asarray(token_bytes, dtype=np.int64))
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    windows = eval_windows(windows, batch_size, max_batches)
    try:
        n = len(windows)
        for i in range(0, n, batch_size):
            w = torch.from_numpy(windows[i : min(i + batch_size, n)]).to(device)
            x, y = w[:, :-1], w[:, 1:]
            with autocast_context(dtype, device):
                logits = model(x, with_mtp=False).logits
            nats = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            )
            total_nats += float(nats)
            total_tokens += y.numel()
            total_bytes += int(lengths[y.cpu()].sum())
    finally:
        model.train(was_training)
    return eval_record(total_nats, total_tokens, total_bytes)


def eval_windows(windows: np.ndarray, batch_size: int, max_batches: int | None) -> np.ndarray:
    """All windows, or max_batches batches of them spread evenly over the split (so periodic estimates
    are not biased to its start)."""
    if max_batches and max_batches * batch_size < len(windows):
        pick = np.linspace(0, len(windows) - 1, max_batches * batch_size).round().astype(np.int64)
        windows = windows[np.unique(pick)]
    return windows


def eval_record(total_nats: float, total_tokens: int, total_bytes: int) -> dict[str, float]:
    """val_loss (nats/token) and val_bpb from the sums over the evaluated targets."""
    if total_tokens == 0:
        raise ValueError("no validation windows to evaluate")
    return {
        "val_loss": total_nats / total_tokens,
        "val_bpb": total_nats / math.log(2) / max(total_bytes, 1),
        "val_tokens": total_tokens,
        "val_bytes": total_bytes,
    }


@torch.no_grad()
def sample_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str = "\n",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """Continue `prompt` with a plain loop that re-runs the model on the growing sequence (no cache:
    quadratic, fine for the few hundred tokens of an end-of-run sample; serving has its own engine)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt)
    limit = model.config.max_position_embeddings
    device = next(model.parameters()).device
    out: list[int] = []
    try:
        for _ in range(max_new_tokens):
            ctx = (ids + out)[-limit:]
            logits = model(torch.tensor([ctx], device=device), with_mtp=False).logits[0, -1].float().cpu()
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            if nxt == tokenizer.eos_id:
                break
            out.append(nxt)
    finally:
        model.train(was_training)
    return prompt + tokenizer.decode(out)
