"""FP8 GPU kernels (Triton, torch scaled_mm) against the emulated reference. Needs an sm_89+ GPU and Triton.

The reference is dsv3.fp8.backends.EmulatedBackend on the same E4M3 operands and scales (never the
Triton CPU interpreter). The tensor cores sum each 128-deep chunk with a narrower internal accumulator
than fp32, so kernel and reference agree to ~1e-3 relative, not bit for bit.
"""

import copy

import pytest
import torch

from dsv3.fp8 import (
    EmulatedBackend,
    FP8Config,
    FP8GroupedExperts,
    FP8Linear,
    FP8NonFiniteError,
    convert_to_fp8,
    fp8_gpu_available,
    get_backend,
    quantize_blocks,
    quantize_rowwise,
)
from dsv3.fp8.backends import reference_gemm, triton_available
from dsv3.fp8.grouped import padded_layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and triton_available() and fp8_gpu_available()),
        reason="needs an FP8-capable CUDA GPU (sm_89+) and Triton",
    ),
]
DEV = "cuda"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _operands(M, N, K, b_block, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    a = torch.randn(M, K, device=DEV, generator=g)
    a[:, :7] *= 50  # uneven tiles
    b = torch.randn(N, K, device=DEV, generator=g) * 0.02
    aq, as_ = quantize_rowwise(a)
    bq, bs = quantize_blocks(b) if b_block else quantize_rowwise(b)
    return aq, as_, bq, bs


def _scaled_mm_or_skip():
    try:
        return get_backend("scaled_mm", DEV)
    except ValueError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("pow2", [False, True])
def test_triton_quantiser_matches_torch(pow2):
    be = get_backend("triton", DEV)
    x = torch.randn(512, 1000, device=DEV) * torch.logspace(-4, 4, 512, device=DEV)[:, None]
    x[3] = 0
    for xx in (x, x.t().contiguous().t(), x.bfloat16()):  # row-major, column-major (dy^T), bf16
        q, s = be.quantize_rowwise(xx, pow2=pow2)
        q_ref, s_ref = quantize_rowwise(xx, pow2=pow2)
        assert q.shape == xx.shape and s.shape == (512, 8)
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
        # a division rounded differently can move a value by one E4M3 step, nothing more
        assert (q.float() != q_ref.float()).float().mean().item() < 1e-3
        assert rel(q.float(), q_ref.float()) < 1e-3
    x[7, 900] = float("inf")
    with pytest.raises(FP8NonFiniteError, match="1 of"):
        be.quantize_rowwise(x)
    x[7, 900] = float("nan")
    _, s = be.quantize_rowwise(x, nonfinite="propagate")
    assert bool(s[7, 7].isnan()) and int(s.isnan().sum()) == 1


@pytest.mark.parametrize("backend", ["triton", "scaled_mm"])
@pytest.mark.parametrize("b_block", [True, False])
@pytest.mark.parametrize(
    ("M", "N", "K"), [(256, 512, 1024), (300, 200, 500), (64, 7168, 2048), (1, 128, 128)]
)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dense_gemm_matches_emulated(backend, b_block, M, N, K, out_dtype):
    be = get_backend("triton", DEV) if backend == "triton" else _scaled_mm_or_skip()
    aq, as_, bq, bs = _operands(M, N, K, b_block)
    try:
        c = be.gemm(aq, as_, bq, bs, b_block=b_block, out_dtype=out_dtype)
    except RuntimeError as e:  # cuBLAS without blockwise-scaling support (needs CUDA >= 12.9)
        if backend == "scaled_mm" and "not supported" in str(e).lower():
            pytest.skip(f"torch scaled_mm blockwise: {e}")
        raise
    torch.cuda.synchronize()
    assert c.shape == (M, N) and c.dtype == out_dtype
    ref = reference_gemm(aq, as_, bq, bs, b_block)
    assert rel(c, ref) < (2e-3 if out_dtype == torch.float32 else 1e-2)
    assert rel(EmulatedBackend().gemm(aq, as_, bq, bs, b_block), ref) < 1e-6


def test_grouped_kernels_match_emulated():
    tri, emu = get_backend("triton", DEV), EmulatedBackend()
    counts = torch.tensor([300, 0, 17, 128, 1000, 5, 0, 64], device=DEV)
    offsets, dest, rows_p = padded_layout(counts)
    x = torch.zeros(rows_p, 512, device=DEV)
    x[dest] = torch.randn(int(counts.sum()), 512, device=DEV)
    w = torch.randn(8, 384, 512, device=DEV) * 0.02
    xq, xs = quantize_rowwise(x)
    wq, ws = quantize_blocks(w)
    y = tri.grouped_gemm(xq, xs, wq, ws, offsets, out_dtype=torch.float32)
    assert rel(y, emu.grouped_gemm(xq, xs, wq, ws, offsets)) < 2e-3
    dy = torch.zeros(rows_p, 384, device=DEV)
    dy[dest] = torch.randn(int(counts.sum()), 384, device=DEV)
    dyq, dys = quantize_rowwise(dy)  # Dgrad: B = W^T per expert
    dx = tri.grouped_gemm(dyq, dys, wq.transpose(1, 2), ws.transpose(1, 2), offsets)
    assert rel(dx, emu.grouped_gemm(dyq, dys, wq.transpose(1, 2), ws.transpose(1, 2), offsets)) < 2e-3
    aq, as_ = quantize_rowwise(dy.t())
    bq, bs = quantize_rowwise(x.t())
    dw = tri.grouped_wgrad(aq, as_, bq, bs, offsets)
    ref = emu.grouped_wgrad(aq, as_, bq, bs, offsets)
    assert dw.shape == (8, 384, 512)
    assert torch.equal(dw[1], torch.zeros_like(dw[1])) and torch.equal(dw[6], torch.zeros_like(dw[6]))
    assert rel(dw, ref) < 2e-3


@pytest.mark.parametrize("backend", ["triton", "scaled_mm"])
def test_fp8linear_on_gpu_matches_emulated(backend):
    if backend == "scaled_mm":
        _scaled_mm_or_skip()
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 768, bias=False, device=DEV)
    gpu = FP8Linear.from_linear(copy.deepcopy(lin), FP8Config(backend=backend), name="gpu")
    emu = FP8Linear.from_linear(copy.deepcopy(lin), FP8Config(backend="emulated"), name="emu")
    x = torch.randn(4, 256, 1024, device=DEV)
    dy = torch.randn(4, 256, 768, device=DEV)
    outs = []
    for m in (gpu, emu):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(xi)
        y.backward(dy.to(y.dtype))
        outs.append((y.float(), xi.grad, m.weight.grad))
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-2


def test_grouped_experts_and_model_on_gpu():
    from dsv3.config import ModelConfig
    from dsv3.model.transformer import Transformer, lm_loss

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    ref = Transformer(cfg).to(DEV)
    model = convert_to_fp8(copy.deepcopy(ref), FP8Config(backend="auto"))
    assert isinstance(model.layers[1].ffn.experts, FP8GroupedExperts)
    emulated = convert_to_fp8(copy.deepcopy(ref), FP8Config(backend="emulated"))
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device=DEV)
    losses = []
    for m in (ref, model, emulated):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = lm_loss(m(ids), ids, mtp_weight=0.3, balance_alpha=1e-4)
        out.loss.backward()
        losses.append(out.loss.item())
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in m.parameters())
    assert abs(losses[1] - losses[2]) / losses[2] < 2e-3, losses  # kernel vs emulated, same recipe
    assert abs(losses[1] - losses[0]) / losses[0] < 1e-2, losses  # FP8 vs BF16
