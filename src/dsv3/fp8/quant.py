"""The one E4M3 tile quantiser: 1x128 tiles for activations and gradients, 128x128 blocks for weights.

Every FP8 tensor in dsv3 goes through this module: FP8Linear and the grouped experts (training), the HF
checkpoint's E4M3 weights with their `weight_scale_inv` (dsv3.checkpoint.hf), and the expert-parallel FP8
dispatch (dsv3.parallel.comm packs `quantize_rowwise`'s codes and scales into one uint8 row). The GPU
quantisation kernel (dsv3.fp8.triton_gemm) follows the same conventions and is tested against this one.

Why tiles: E4M3 has 3 mantissa bits and a dynamic range of 2^-9 .. 448. One scale per tensor lets a
single outlier channel push every other value into the subnormals; one scale per 1x128 tile (one
token, 128 channels) or per 128x128 weight block confines an outlier's damage to its own tile, which is
what lets DeepSeek-V3 keep E4M3 (not E5M2) for every tensor, gradients included.

Conventions (the same as DeepSeek's kernels and the HF checkpoint's `weight_scale_inv`):
- a tile's scale is s = amax / 448 (the multiplier that dequantises; the checkpoint stores exactly this
  s under the name `weight_scale_inv`, the inverse of the quantising multiplier 448 / amax):
  q = clamp(x / s) in E4M3, x ~= q * s;
- scales are computed online from the tile's current amax (no delayed scaling, no history);
- `pow2=True` rounds s up to a power of two, so scaling is exact and q * s loses nothing beyond E4M3;
- an all-zero tile gets s = 1 (q = 0 exactly); a tile so small that amax / 448 would underflow fp32's
  normal range gets s = fp32's smallest normal, so x / s stays finite; edges that are not a multiple
  of 128 form partial tiles scaled from the elements present (zero padding never raises an amax).

Non-finite policy (one policy, for every caller): a tile holding inf or NaN is never quantised silently.
torch's E4M3 cast saturates inf to 448 and amax / 448 of an inf tile is an inf scale that turns the
tile's finite values into 0 and its inf into NaN: plausible-looking garbage either way. Instead the
tile's scale is NaN (and so are its codes), and with it every value dequantised from it and every GEMM
result that reads it. What the caller chooses is only whether to look:
- `nonfinite="raise"` checks (one host sync) and raises FP8NonFiniteError (a ValueError) naming the
  tensor and counting the bad tiles. The checkpoint writer always raises, naming the HF tensor; training
  raises by default (FP8Config.nonfinite).
- `nonfinite="propagate"` returns the NaN scales without a sync; the trainer's non-finite-loss guard
  then skips the step. The expert-parallel wire always propagates: raising on one rank in the middle of
  a dispatch would leave its peers blocked in the all-to-all, while a NaN scale reaches every rank that
  reads the tile.

Layouts: `quantize_rowwise(x [R, K])` -> scales [R, ceil(K/128)] (1x128 tiles along the last dim);
`quantize_colwise(x [R, K])` -> scales [ceil(R/128), K] (128x1 tiles, for a GEMM that reduces over R);
`quantize_blocks(w [..., N, K])` -> scales [..., ceil(N/128), ceil(K/128)] (the HF weight_scale_inv layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
BLOCK = 128
NONFINITE_MODES = ("raise", "propagate")
_MIN_SCALE = float(torch.finfo(torch.float32).tiny)  # keeps x / s finite for denormal-sized tiles


class FP8NonFiniteError(ValueError):
    """A tensor handed to FP8 quantisation holds inf or NaN."""


def _check_mode(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")


def _nonfinite_error(n_bad: int, n_tiles: int, what: str) -> FP8NonFiniteError:
    return FP8NonFiniteError(
        f"fp8: {what} holds inf/NaN in {n_bad} of {n_tiles} tiles; refusing to quantise it "
        "(an inf would saturate to 448 and the result would be silently wrong)"
    )


def scales_from_amax(amax: torch.Tensor, pow2: bool = False, nonfinite: str = "raise", what: str = "tensor"):
    """Per-tile amax (fp32) -> dequantisation scales s = amax / 448 (rounded up to 2^k when pow2).

    Zero tiles get s = 1; non-finite tiles get s = NaN, after raising first when nonfinite="raise"."""
    _check_mode(nonfinite)
    bad = ~torch.isfinite(amax)
    if nonfinite == "raise" and bool(bad.any()):
        raise _nonfinite_error(int(bad.sum()), amax.numel(), what)
    s = (amax / FP8_MAX).clamp_min(_MIN_SCALE)
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    s = torch.where(amax > 0, s, torch.ones_like(s))
    return torch.where(bad, torch.full_like(s, float("nan")), s)


def finish_scales(s: torch.Tensor, nonfinite: str, what: str) -> torch.Tensor:
    """For kernels that mark a non-finite tile with a NaN scale: raise, or keep the NaN (propagate)."""
    _check_mode(nonfinite)
    if nonfinite == "raise":
        bad = ~torch.isfinite(s)
        if bool(bad.any()):
            raise _nonfinite_error(int(bad.sum()), s.numel(), what)
    return s


def _to_fp8(scaled: torch.Tensor) -> torch.Tensor:
    # the clamp guards the division's last-ulp overshoot of 448; NaN stays NaN through clamp and cast
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rowwise(
    x: torch.Tensor,
    block: int = BLOCK,
    pow2: bool = False,
    nonfinite: str = "raise",
    what: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] E4M3, s [..., ceil(K/block)] fp32): one scale per 1 x block tile."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"quantize_rowwise needs a non-empty last dimension, got shape {tuple(x.shape)}")
    K = x.shape[-1]
    kb = -(-K // block)
    x32 = x.detach().float()  # quantisation has no gradient; FP8Linear's backward is its own
    width = min(block, K)  # a single partial tile needs no padding
    pad = kb * width - K
    tiles = (F.pad(x32, (0, pad)) if pad else x32).reshape(*x.shape[:-1], kb, width)
    amax = tiles.abs().amax(dim=-1)  # amax propagates NaN, so a NaN tile has a NaN amax
    s = scales_from_amax(amax, pow2, nonfinite, what)
    q = _to_fp8(tiles / s.unsqueeze(-1)).view(*x.shape[:-1], kb * width)
    return (q[..., :K] if pad else q).contiguous(), s


def dequantize_rowwise(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Inverse of quantize_rowwise, in fp32."""
    K = q.shape[-1]
    kb = -(-K // block)
    if tuple(s.shape) != (*q.shape[:-1], kb):
        raise ValueError(f"rowwise scales have shape {tuple(s.shape)}, expected {(*q.shape[:-1], kb)}")
    return q.float() * s.repeat_interleave(block, dim=-1)[..., :K]


def quantize_colwise(
    x: torch.Tensor,
    block: int = BLOCK,
    pow2: bool = False,
    nonfinite: str = "raise",
    what: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (q [R, K], s [ceil(R/block), K]): one scale per block x 1 tile (down a column)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_colwise expects a 2-D tensor, got shape {tuple(x.shape)}")
    q, s = quantize_rowwise(x.t(), block, pow2, nonfinite, what)
    return q.t().contiguous(), s.t().contiguous()


def dequantize_colwise(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    return dequantize_rowwise(q.t(), s.t(), block).t()


def quantize_blocks(
    w: torch.Tensor,
    block: int = BLOCK,
    pow2: bool = False,
    nonfinite: str = "raise",
    what: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q [..., N, K], s [..., ceil(N/block), ceil(K/block)]): one scale per block x block.

    For a 2-D weight the scales are exactly the HF checkpoint's `weight_scale_inv`."""
    if w.dim() < 2 or w.shape[-1] == 0 or w.shape[-2] == 0:
        raise ValueError(
            f"quantize_blocks expects a non-empty [..., N, K] weight, got shape {tuple(w.shape)}"
        )
    *lead, N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    w32 = w.detach().float()
    pn, pk = nb * block - N, kb * block - K
    p = F.pad(w32, (0, pk, 0, pn)) if pn or pk else w32
    blocks = p.reshape(*lead, nb, block, kb, block)
    amax = blocks.abs().amax(dim=(-3, -1))
    s = scales_from_amax(amax, pow2, nonfinite, what)
    q = _to_fp8(blocks / s.unsqueeze(-1).unsqueeze(-3)).reshape(*lead, nb * block, kb * block)
    return q[..., :N, :K].contiguous(), s


def expand_block_scales(s: torch.Tensor, shape: tuple[int, int], block: int = BLOCK) -> torch.Tensor:
    """Block scales [..., NB, KB] -> per-element scales [..., N, K]."""
    N, K = shape
    return s.repeat_interleave(block, dim=-2)[..., :N, :].repeat_interleave(block, dim=-1)[..., :K]


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Inverse of quantize_blocks, in fp32 (s may be a checkpoint's weight_scale_inv in any float dtype)."""
    *lead, N, K = q.shape
    expect = (*lead, -(-N // block), -(-K // block))
    if tuple(s.shape) != expect:
        raise ValueError(
            f"block scales have shape {tuple(s.shape)}, expected {expect} for a weight {tuple(q.shape)}"
        )
    return q.float() * expand_block_scales(s.float(), (N, K), block)


def fake_quantize_blocks(w: torch.Tensor, pow2: bool = False, nonfinite: str = "raise") -> torch.Tensor:
    """w rounded through 128x128-block E4M3 and back (fp32): what an FP8 GEMM actually multiplies by."""
    return dequantize_blocks(*quantize_blocks(w, pow2=pow2, nonfinite=nonfinite))
