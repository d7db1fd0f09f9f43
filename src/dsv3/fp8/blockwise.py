"""128x128 block quantisation of weights in the HF checkpoint layout.

A weight W [out, in] is stored as float8_e4m3fn with a float32 `weight_scale_inv` of shape
[ceil(out/128), ceil(in/128)]; dequantisation multiplies each 128x128 block by its scale_inv.
The scale is chosen from the block's current amax so that amax maps to E4M3's largest finite value
(448): scale_inv = amax / 448. Edge blocks that are not full are scaled from the elements present.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
BLOCK = 128


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    out, inp = w.shape
    po, pi = (-out) % block, (-inp) % block
    return torch.nn.functional.pad(w, (0, pi, 0, po)) if po or pi else w


def quantize_weight_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] (any float dtype) -> (W_fp8 [out, in] e4m3fn, scale_inv [ceil(out/b), ceil(in/b)] fp32)."""
    if w.dim() != 2:
        raise ValueError(f"blockwise quantisation expects a 2-D weight, got shape {tuple(w.shape)}")
    w32 = w.detach().float()
    if not torch.isfinite(w32).all():
        raise ValueError("cannot quantise a weight with non-finite values (inf/NaN)")
    out, inp = w32.shape
    p = _pad_to_blocks(w32, block)
    nb_o, nb_i = p.shape[0] // block, p.shape[1] // block
    blocks = p.view(nb_o, block, nb_i, block)
    amax = blocks.abs().amax(dim=(1, 3))  # [nb_o, nb_i]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(p.shape)[:out, :inp].contiguous(), scale_inv.contiguous()


def dequantize_weight_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize_weight_blockwise`: each 128x128 block of q times its scale_inv."""
    out, inp = q.shape
    nb_o, nb_i = -(-out // block), -(-inp // block)
    if tuple(scale_inv.shape) != (nb_o, nb_i):
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {(nb_o, nb_i)} "
            f"for a weight {(out, inp)}"
        )
    s = scale_inv.float().repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    return (q.float() * s).to(dtype)
