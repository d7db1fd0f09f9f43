"""The one FP8 quantiser seen from its three users: the HF checkpoint writer, training (FP8Linear's
weight blocks and input tiles) and the expert-parallel wire. Same tile in, same bits out; one
non-finite policy on every path."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.fp8 import FP8_DTYPE, FP8_MAX, FP8Config, FP8NonFiniteError, dequantize_blocks, dequantize_rowwise
from dsv3.fp8.linear import quantize_input, quantize_weight
from dsv3.parallel.comm import dequantize_rows_fp8, quantize_rows_fp8

CFG = FP8Config(backend="emulated")
W1 = "model.layers.0.mlp.gate_proj.weight"  # layers.0.ffn.w1: [intermediate_size, hidden_size]


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.contiguous().view(torch.uint8)


def _unpack(packed: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The wire row's E4M3 codes and float32 scales."""
    return packed[:, :dim].contiguous().view(FP8_DTYPE), packed[:, dim:].contiguous().view(torch.float32)


def _tiny_model() -> Transformer:
    """The debug model with hidden_size 128, so that its dense w1 is exactly one 128x128 block."""
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("debug").replace(hidden_size=128, intermediate_size=128))


def _same_amax_tile() -> torch.Tensor:
    """A 128x128 tile whose rows share one amax (3.0), so its 1x128 and 128x128 scales coincide."""
    x = torch.randn(128, 128, generator=torch.Generator().manual_seed(1)).clamp(-2.5, 2.5)
    x[0::2, 17], x[1::2, 17] = 3.0, -3.0
    return x * 0.01


def test_checkpoint_training_and_wire_quantise_a_tile_bitwise_identically(tmp_path):
    tile = _same_amax_tile()
    model = _tiny_model()
    with torch.no_grad():
        model.layers[0].ffn.w1.weight.copy_(tile)
    save_pretrained(model, tmp_path / "m", dtype=torch.float32, fp8=True)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        q_ckpt, s_ckpt = f.get_tensor(W1), f.get_tensor(W1 + "_scale_inv")
    q_w, s_w = quantize_weight(tile, CFG, "w1 weight")  # training: FP8Linear's weight blocks
    q_a, s_a = quantize_input(tile, CFG, "w1 input")  # training: FP8Linear's 1x128 input tiles
    q_wire, s_wire = _unpack(quantize_rows_fp8(tile), 128)  # the expert-parallel dispatch

    assert s_ckpt.shape == s_w.shape == (1, 1) and s_a.shape == s_wire.shape == (128, 1)
    assert torch.equal(s_ckpt, (torch.tensor(0.03) / FP8_MAX).view(1, 1))  # weight_scale_inv = amax / 448
    for s in (s_w, s_a, s_wire):
        assert torch.equal(s, s_ckpt.expand_as(s))
    for q in (q_w, q_a, q_wire):
        assert torch.equal(_bits(q), _bits(q_ckpt))
    # and the three dequantisations (checkpoint load, GEMM operand, wire receive) agree bit for bit
    deq = dequantize_blocks(q_ckpt, s_ckpt)
    assert torch.equal(dequantize_rowwise(q_a, s_a), deq)
    assert torch.equal(dequantize_rows_fp8(quantize_rows_fp8(tile), 128, torch.float32), deq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_input_tiles_are_the_wire_format(dtype):
    # partial edge tiles (300 = 2 x 128 + 44), a zero row, a tile of tiny values, magnitudes 1e-3 .. 1e3
    x = (torch.randn(9, 300) * torch.logspace(-3, 3, 9).unsqueeze(1)).to(dtype)
    x[4] = 0.0
    x[6, 256:] = 1e-30
    q_a, s_a = quantize_input(x, CFG, "input")
    q_wire, s_wire = _unpack(quantize_rows_fp8(x), 300)
    assert torch.equal(_bits(q_a), _bits(q_wire)) and torch.equal(s_a, s_wire)


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_nonfinite_tile_gets_a_nan_scale_on_every_path(bad):
    x = torch.randn(4, 256)
    x[2, 200] = bad
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[2, 128:] = False
    # the wire propagates (no rank may raise mid all-to-all): the bad tile arrives as NaN, the rest intact
    packed = quantize_rows_fp8(x)
    _, s_wire = _unpack(packed, 256)
    assert bool(s_wire[2, 1].isnan()) and bool(torch.isfinite(s_wire[keep.view(4, 2, 128)[:, :, 0]]).all())
    y = dequantize_rows_fp8(packed, 256, torch.float32)
    clean = x.clone()
    clean[2, 128:] = 0.0
    assert bool(y[2, 128:].isnan().all())
    assert torch.equal(y[keep], dequantize_rows_fp8(quantize_rows_fp8(clean), 256, torch.float32)[keep])
    # training with nonfinite="propagate" computes the same scales, NaN included; "raise" names the tensor
    _, s_a = quantize_input(x, FP8Config(backend="emulated", nonfinite="propagate"), "input")
    assert torch.equal(s_a.isnan(), s_wire.isnan()) and torch.equal(s_a.nan_to_num(), s_wire.nan_to_num())
    with pytest.raises(FP8NonFiniteError, match="layers.0.ffn.w1 input holds inf/NaN in 1 of 8 tiles"):
        quantize_input(x.clone(), CFG, "layers.0.ffn.w1 input")
    # a weight block: NaN scale, never an inf one (amax / 448 of an inf tile) and never a saturated 448
    w = torch.randn(200, 256)
    w[150, 3] = bad
    _, s_w = quantize_weight(w, FP8Config(backend="emulated", nonfinite="propagate"), "w")
    assert bool(s_w[1, 0].isnan()) and int(s_w.isnan().sum()) == 1 and not bool(s_w.isinf().any())


def test_checkpoint_writer_refuses_nonfinite_weights_naming_the_tensor(tmp_path):
    model = _tiny_model()
    with torch.no_grad():
        model.layers[0].ffn.w1.weight[5, 7] = float("inf")
    with pytest.raises(FP8NonFiniteError, match=rf"checkpoint tensor '{W1}' holds inf/NaN in 1 of 1 tiles"):
        save_pretrained(model, tmp_path / "m", fp8=True)
    assert not (tmp_path / "m").exists()  # the directory appears atomically, or not at all
    assert save_pretrained(model, tmp_path / "bf16").exists()  # no FP8 requested: nothing to quantise
