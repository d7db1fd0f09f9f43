"""E4M3 fine-grained quantisation: tile/block layouts, error bounds, scales, zero and non-finite tiles."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    FP8NonFiniteError,
    dequantize_blocks,
    dequantize_colwise,
    dequantize_rowwise,
    quantize_blocks,
    quantize_colwise,
    quantize_rowwise,
)

# E4M3: 3 mantissa bits -> a normal value rounds within 2^-4 of itself; below the smallest normal (2^-6,
# in scaled units) the spacing is 2^-9, so the absolute error is at most 2^-10 times the tile's scale.
REL = 2.0**-4
SUBNORMAL_ABS = 2.0**-10


def _tile_magnitudes(x: torch.Tensor, width: int = 128) -> torch.Tensor:
    """Give every 1 x width tile of x [R, K] its own magnitude between 1e-6 and 1e6."""
    R, K = x.shape
    kb = -(-K // width)
    mag = torch.logspace(-6, 6, R * kb)[torch.randperm(R * kb)].reshape(R, kb)
    return x * mag.repeat_interleave(width, dim=1)[:, :K]


def _assert_within_e4m3(x: torch.Tensor, deq: torch.Tensor, scale_per_elem: torch.Tensor) -> None:
    err = (x - deq).abs()
    bound = torch.maximum(REL * x.abs(), SUBNORMAL_ABS * scale_per_elem) * (1 + 1e-6)
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


def test_rowwise_tiles_layout_and_error_bound():
    x = _tile_magnitudes(torch.randn(7, 300))  # 300 = 2 full tiles + a partial edge tile of 44
    q, s = quantize_rowwise(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert s.shape == (7, 3) and s.dtype == torch.float32
    amax = torch.stack([x[:, i * 128 : (i + 1) * 128].abs().amax(1) for i in range(3)], dim=1)
    torch.testing.assert_close(s, amax / FP8_MAX, rtol=1e-6, atol=0)
    deq = dequantize_rowwise(q, s)
    _assert_within_e4m3(x, deq, s.repeat_interleave(128, 1)[:, :300])
    # each tile's largest element lands on 448 exactly, so it comes back (to fp32 rounding)
    torch.testing.assert_close(deq.abs().amax(1), x.abs().amax(1), rtol=1e-6, atol=0)


def test_colwise_tiles_are_rowwise_tiles_of_the_transpose():
    x = _tile_magnitudes(torch.randn(200, 5).t().contiguous()).t()  # magnitudes vary down the columns
    q, s = quantize_colwise(x)
    assert q.shape == (200, 5) and s.shape == (2, 5)
    qt, st_ = quantize_rowwise(x.t())
    assert torch.equal(q.t().float(), qt.float()) and torch.equal(s.t(), st_)
    _assert_within_e4m3(x, dequantize_colwise(q, s), s.repeat_interleave(128, 0)[:200])


def test_blocks_match_hf_weight_scale_inv_layout():
    w = torch.randn(300, 200) * 0.02
    w[:128, :128] *= 1000  # one loud block must not degrade the others
    q, s = quantize_blocks(w)
    assert s.shape == (math.ceil(300 / 128), math.ceil(200 / 128)) == (3, 2)
    # DeepSeek's convention written out block by block: weight_scale_inv = amax / 448 dequantises
    for i in range(3):
        for j in range(2):
            blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            s_ref = blk.abs().amax() / FP8_MAX
            assert torch.equal(s[i, j], s_ref)
            q_ref = (blk / s_ref).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            assert torch.equal(
                q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].view(torch.uint8), q_ref.view(torch.uint8)
            )
    per_elem = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    _assert_within_e4m3(w, dequantize_blocks(q, s), per_elem)
    assert torch.equal(dequantize_blocks(q, s.to(torch.bfloat16)), q.float() * per_elem.bfloat16().float())


def test_stacked_expert_blocks_equal_per_expert_blocks():
    w = torch.randn(3, 130, 260)
    q, s = quantize_blocks(w)
    assert s.shape == (3, 2, 3)
    for e in range(3):
        qe, se = quantize_blocks(w[e])
        assert torch.equal(q[e].float(), qe.float()) and torch.equal(s[e], se)


def test_pow2_scales_are_powers_of_two_and_rescaling_is_exact():
    x = _tile_magnitudes(torch.randn(5, 256))
    q, s = quantize_rowwise(x, pow2=True)
    log2 = torch.log2(s)
    assert torch.equal(log2, log2.round())
    assert bool((s >= x.abs().view(5, 2, 128).amax(-1) / FP8_MAX).all())  # never overflows 448
    deq = dequantize_rowwise(q, s)
    _assert_within_e4m3(x, deq, s.repeat_interleave(128, 1))
    # power-of-two scaling is exact: requantising the dequantised values reproduces them bit for bit
    assert torch.equal(dequantize_rowwise(*quantize_rowwise(deq, pow2=True)), deq)
    assert torch.equal((deq / s.repeat_interleave(128, 1)).to(FP8_DTYPE).float(), q.float())


def test_outlier_only_affects_its_own_tile():
    x = torch.randn(4, 512)
    y = x.clone()
    y[0, 3] = 1e6  # outlier in tile (0, 0)
    dx = dequantize_rowwise(*quantize_rowwise(x))
    dy = dequantize_rowwise(*quantize_rowwise(y))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :128] = False
    assert torch.equal(dx[mask], dy[mask])
    # inside its own tile it flushes ordinary values to zero: with one per-tensor scale, the whole tensor
    assert (dy[0, 4:128] == 0).float().mean() > 0.5


def test_zero_and_tiny_tiles():
    x = torch.zeros(3, 200)
    x[1, 150:] = 1e-40  # a denormal-sized tile
    q, s = quantize_rowwise(x)
    assert s[0, 0] == 1.0 and s[0, 1] == 1.0 and torch.equal(q[0].float(), torch.zeros(200))
    assert bool(torch.isfinite(s).all()) and bool(torch.isfinite(q.float()).all())
    deq = dequantize_rowwise(q, s)
    assert torch.equal(deq[0], torch.zeros(200)) and bool(torch.isfinite(deq).all())
    qw, sw = quantize_blocks(torch.zeros(130, 7))
    assert torch.equal(sw, torch.ones(2, 1)) and torch.equal(qw.float(), torch.zeros(130, 7))


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_nonfinite_raises_with_the_tensor_named(bad):
    x = torch.randn(4, 256)
    x[2, 200] = bad
    with pytest.raises(FP8NonFiniteError, match="layers.3.attn.wo input.*1 of 8 tiles"):
        quantize_rowwise(x, what="layers.3.attn.wo input")
    w = torch.randn(256, 256)
    w[5, 5] = bad
    with pytest.raises(FP8NonFiniteError, match="weight"):
        quantize_blocks(w)
    assert issubclass(FP8NonFiniteError, ValueError)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_propagate_gives_nan_never_saturated_garbage(bad):
    x = torch.randn(4, 256)
    x[2, 200] = bad
    # torch's E4M3 cast saturates inf to 448: exactly the silent garbage the checks exist to prevent
    assert torch.tensor([float("inf")]).to(FP8_DTYPE).float().item() == FP8_MAX
    q, s = quantize_rowwise(x, nonfinite="propagate")
    deq = dequantize_rowwise(q, s)
    assert bool(deq[2, 128:].isnan().all())  # the whole bad tile reads as NaN
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[2, 128:] = False
    assert bool(torch.isfinite(deq[keep]).all())


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="nonfinite"):
        quantize_rowwise(torch.randn(2, 4), nonfinite="ignore")
    with pytest.raises(ValueError, match="scales have shape"):
        dequantize_rowwise(torch.zeros(2, 300, dtype=FP8_DTYPE), torch.ones(2, 2))
    with pytest.raises(ValueError, match="block scales"):
        dequantize_blocks(torch.zeros(300, 4, dtype=FP8_DTYPE), torch.ones(2, 1))
    with pytest.raises(ValueError, match="non-empty"):
        quantize_blocks(torch.zeros(4))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 400),
    log_mag=st.floats(-20, 20),
    pow2=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rowwise_bound_holds_for_any_shape_and_magnitude(rows, cols, log_mag, pow2, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 2.0**log_mag
    q, s = quantize_rowwise(x, pow2=pow2)
    assert s.shape == (rows, math.ceil(cols / 128))
    _assert_within_e4m3(x, dequantize_rowwise(q, s), s.repeat_interleave(128, 1)[:, :cols])
