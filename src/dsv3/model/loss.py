"""Cross-entropy over the vocabulary, in FP32 row chunks.

`F.cross_entropy(logits.float(), ...)` materialises the [N, V] logits in FP32, their log-softmax, a
zero-filled [N, V] gradient and the log-softmax backward: five passes over 4N*V-byte arrays that do not
fit in cache (16 MiB each at the tiny preset's 2048 x 2048, twice per step with MTP). Here each chunk of
rows is upcast, reduced to its log-sum-exp and dropped; the backward recomputes softmax - one_hot per
chunk and writes the gradient straight in the logits' dtype. Same FP32 arithmetic per row; the mean is
over the rows whose target is not `ignore_index`, as in torch.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 256  # 256 x V FP32 values per chunk: 2 MiB at V = 2048, L2-sized


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, chunk: int):
        valid = target != ignore_index
        tgt = torch.where(valid, target, 0)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], chunk):
            torch.logsumexp(logits[s : s + chunk].float(), dim=-1, out=lse[s : s + chunk])
        picked = logits.gather(1, tgt[:, None]).squeeze(1).float()
        n = valid.sum()
        loss = torch.where(valid, lse - picked, 0.0).sum() / n
        ctx.save_for_backward(logits, tgt, valid, lse, n)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, tgt, valid, lse, n = ctx.saved_tensors
        scale = torch.where(valid, grad_loss / n, 0.0)  # [N]: d loss / d row
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            rows = slice(s, s + ctx.chunk)
            p = torch.exp(logits[rows].float() - lse[rows, None])  # softmax
            p.scatter_add_(1, tgt[rows, None], p.new_full((p.shape[0], 1), -1.0))  # - one_hot
            grad[rows] = p.mul_(scale[rows, None])
        return grad, None, None, None


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] (any float dtype, computed in FP32) against target [N]."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy wants logits [N, V] and target [N], got {logits.shape} / {target.shape}"
        )
    return _ChunkedCrossEntropy.apply(logits, target, ignore_index, chunk_rows)
