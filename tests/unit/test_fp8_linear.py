"""FP8 GEMMs: emulated backend, FP8Linear (Fprop/Dgrad/Wgrad), FP8GroupedExperts, saved-tensor memory."""

import copy

import pytest
import torch
from torch import nn

from dsv3.fp8 import (
    FP8_DTYPE,
    EmulatedBackend,
    FP8Config,
    FP8GroupedExperts,
    FP8Linear,
    FP8NonFiniteError,
    dequantize_blocks,
    dequantize_rowwise,
    get_backend,
    quantize_blocks,
    quantize_rowwise,
)
from dsv3.fp8.backends import reference_gemm
from dsv3.fp8.grouped import padded_layout
from dsv3.fp8.quant import fake_quantize_blocks
from dsv3.model.moe import GroupedExperts


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small GEMMs are op-overhead bound: one thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fq_rows(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantise x [R, K] through 1x128 tiles (fp64 result)."""
    return dequantize_rowwise(*quantize_rowwise(x)).double()


def fq_blocks(w: torch.Tensor) -> torch.Tensor:
    return dequantize_blocks(*quantize_blocks(w)).double()


# ------------------------------------------------------------------ backend seam
@pytest.mark.parametrize("b_block", [True, False])
def test_emulated_gemm_equals_the_per_128_chunk_promotion_recipe(b_block):
    """C = sum over 128-wide K chunks of (A_q B_q^T)_chunk * sa * sb (reference_gemm, in fp64)."""
    a, b = torch.randn(33, 300), torch.randn(140, 300) * 1e-3
    aq, as_ = quantize_rowwise(a)
    bq, bs = quantize_blocks(b) if b_block else quantize_rowwise(b)
    c = EmulatedBackend().gemm(aq, as_, bq, bs, b_block=b_block)
    assert rel(c, reference_gemm(aq, as_, bq, bs, b_block)) < 1e-6
    assert rel(c, a @ b.t()) < 0.06  # and it is a real E4M3 product, close to the exact one


def test_emulated_grouped_gemm_and_wgrad_equal_per_expert_gemms():
    be = EmulatedBackend()
    counts = torch.tensor([130, 0, 5, 128])
    offsets, dest, rows_p = padded_layout(counts)
    assert offsets.tolist() == [0, 256, 256, 384, 512] and rows_p == 512
    x = torch.zeros(rows_p, 200)
    x[dest] = torch.randn(int(counts.sum()), 200)
    w = torch.randn(4, 72, 200)
    xq, xs = quantize_rowwise(x)
    wq, ws = quantize_blocks(w)
    y = be.grouped_gemm(xq, xs, wq, ws, offsets)
    dy = torch.randn(rows_p, 72)
    dy[x.abs().sum(1) == 0] = 0  # padding rows carry no gradient
    dyt_q, dyt_s = quantize_rowwise(dy.t())
    xt_q, xt_s = quantize_rowwise(x.t())
    dw = be.grouped_wgrad(dyt_q, dyt_s, xt_q, xt_s, offsets)
    assert dw.shape == (4, 72, 200)
    for e in range(4):
        s0, s1 = offsets[e].item(), offsets[e + 1].item()
        if s1 == s0:
            assert torch.equal(dw[e], torch.zeros(72, 200))
            continue
        ref = be.gemm(xq[s0:s1], xs[s0:s1], wq[e], ws[e], b_block=True)
        torch.testing.assert_close(y[s0:s1], ref, rtol=1e-5, atol=1e-5)
        ref_w = be.gemm(
            dyt_q[:, s0:s1],
            dyt_s[:, s0 // 128 : s1 // 128],
            xt_q[:, s0:s1],
            xt_s[:, s0 // 128 : s1 // 128],
            False,
        )
        torch.testing.assert_close(dw[e], ref_w, rtol=1e-5, atol=1e-5)


def test_backend_selection():
    assert get_backend("auto", "cpu").name == "emulated"
    assert get_backend("emulated").name == "emulated"
    with pytest.raises(ValueError, match="unknown fp8 backend"):
        get_backend("cutlass")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            get_backend("triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        FP8Config(backend="fast")


# ------------------------------------------------------------------ FP8Linear
def _pair(in_f=300, out_f=200, seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=False)
    return ref, FP8Linear.from_linear(copy.deepcopy(ref), name="proj")


def test_fp8linear_fprop_dgrad_wgrad_follow_the_recipe_exactly():
    ref, fp8 = _pair()
    x = torch.randn(3, 50, 300, requires_grad=True)
    dy = torch.randn(3, 50, 200)
    y = fp8(x)
    y.backward(dy)
    x2, dy2, W = x.detach().reshape(-1, 300), dy.reshape(-1, 200), ref.weight.detach()
    assert rel(y.reshape(-1, 200), fq_rows(x2) @ fq_blocks(W).t()) < 1e-6  # Fprop: 1x128 x 128x128
    assert rel(x.grad.reshape(-1, 300), fq_rows(dy2) @ fq_blocks(W)) < 1e-6  # Dgrad: 1x128 x 128x128^T
    x_cached = fq_rows(x2).float()  # Wgrad: the FP8-cached input, re-tiled 128x1 along tokens
    wgrad = fq_rows(dy2.t()) @ fq_rows(x_cached.t()).t()
    assert rel(fp8.weight.grad, wgrad) < 1e-6


def test_fp8linear_close_to_fp32_and_bf16_within_e4m3_error():
    ref, fp8 = _pair()
    x = torch.randn(4, 64, 300)
    dy = torch.randn(4, 64, 200)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), fp8(xb)
    ya.backward(dy)
    yb.backward(dy)
    errs = [rel(yb, ya), rel(xb.grad, xa.grad), rel(fp8.weight.grad, ref.weight.grad)]
    # E4M3 rounds each operand by up to 2^-4 (about 3% RMS for Gaussian data): each GEMM lands a few % off
    assert all(0.005 < e < 0.0625 for e in errs), errs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yc = ref(x)
        yd = fp8(x)
    assert yd.dtype == torch.bfloat16 == yc.dtype
    assert rel(yd.float(), ya.detach()) < 0.0625 and rel(yc.float(), ya.detach()) < 0.01


def test_autocast_training_keeps_fp32_master_grads():
    _, fp8 = _pair()
    x = torch.randn(2, 10, 300, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
    y.float().sum().backward()
    assert fp8.weight.dtype == torch.float32 and fp8.weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32 and bool(torch.isfinite(x.grad).all())


def _saved(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_input_is_cached_for_backward_in_fp8():
    ref, fp8 = _pair()
    x = torch.randn(4, 64, 300, requires_grad=True)
    params = {p.data_ptr() for p in fp8.parameters()}
    _, saved = _saved(lambda: fp8(x))
    acts = [t for t in saved if t.data_ptr() not in params]
    assert {t.dtype for t in acts} == {FP8_DTYPE, torch.float32}
    fp8_bytes = sum(t.numel() * t.element_size() for t in acts)
    q = [t for t in acts if t.dtype == FP8_DTYPE]
    assert len(q) == 1 and q[0].shape == (256, 300)
    # 1 byte per value + one fp32 scale per 128 values, against 2 bytes per value for a BF16 cache
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, saved_bf16 = _saved(lambda: ref(x))
    # (autocast also saves its bf16 copy of the weight; count the activation only)
    bf16_bytes = sum(t.numel() * t.element_size() for t in saved_bf16 if t.numel() != ref.weight.numel())
    assert bf16_bytes == 256 * 300 * 2
    assert fp8_bytes == 256 * 300 + 256 * 3 * 4 < 0.6 * bf16_bytes


def test_sibling_projections_share_one_fp8_copy_of_their_input():
    _, a = _pair(300, 64)
    _, b = _pair(300, 32, seed=1)
    x = torch.randn(2, 16, 300, requires_grad=True)
    _, saved = _saved(lambda: (a(x), b(x)))
    fp8_saved = {t.data_ptr() for t in saved if t.dtype == FP8_DTYPE}
    assert len(fp8_saved) == 1
    with torch.no_grad():
        x.add_(torch.randn_like(x))  # an in-place change bumps the version: no stale reuse
    _, saved2 = _saved(lambda: a(x))
    (q,) = [t for t in saved2 if t.dtype == FP8_DTYPE]
    assert torch.equal(q.float(), quantize_rowwise(x.detach().reshape(-1, 300))[0].float())


def test_nonfinite_input_and_gradient_are_reported():
    _, fp8 = _pair()
    x = torch.randn(2, 300)
    x[1, 7] = float("inf")
    with pytest.raises(FP8NonFiniteError, match="proj input"):
        fp8(x)
    y = fp8(torch.randn(2, 300, requires_grad=True))
    with pytest.raises(FP8NonFiniteError, match="gradient of proj output"):
        y.backward(torch.full_like(y, float("nan")))
    prop = FP8Linear.from_linear(fp8, FP8Config(nonfinite="propagate"), name="p")
    out = prop(x)
    assert bool(out[1].isnan().all()) and bool(torch.isfinite(out[0]).all())


def test_zero_input_gives_zero_output_and_grads():
    _, fp8 = _pair()
    x = torch.zeros(5, 300, requires_grad=True)
    y = fp8(x)
    y.sum().backward()
    assert torch.equal(y, torch.zeros(5, 200)) and torch.equal(fp8.weight.grad, torch.zeros(200, 300))
    assert bool(torch.isfinite(x.grad).all())


def test_dequantized_weight_is_the_fp8_weight_with_straight_through_grad():
    _, fp8 = _pair()
    w = fp8.dequantized_weight()
    torch.testing.assert_close(w, fake_quantize_blocks(fp8.weight.detach()), rtol=0, atol=0)
    g = torch.randn_like(w)
    (w * g).sum().backward()
    torch.testing.assert_close(fp8.weight.grad, g)


# ------------------------------------------------------------------ grouped experts
def _experts(E=4, D=160, I=96):
    torch.manual_seed(0)
    ref = GroupedExperts(E, D, I)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.05)
    return ref, FP8GroupedExperts.from_experts(copy.deepcopy(ref), name="experts")


def test_grouped_experts_equal_per_expert_fp8_linears():
    """Expert segments are 128-aligned, so every tile (Wgrad's token tiles too) equals a dense FP8Linear's."""
    _, fe = _experts()
    counts = torch.tensor([70, 0, 200, 33])
    x = torch.randn(int(counts.sum()), 160, requires_grad=True)
    dy = torch.randn(int(counts.sum()), 160)
    y = fe.forward_sorted(x, counts)
    y.backward(dy)
    start = 0
    for e, n in enumerate(counts.tolist()):
        lin = {k: FP8Linear(1, 1, name=k) for k in ("w1", "w2", "w3")}
        for k, m in lin.items():
            m.weight = nn.Parameter(getattr(fe, k).detach()[e].clone())
            m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]
        xe = x.detach()[start : start + n].clone().requires_grad_()
        ye = lin["w2"](torch.nn.functional.silu(lin["w1"](xe)) * lin["w3"](xe))
        if n:
            ye.backward(dy[start : start + n])
            torch.testing.assert_close(y[start : start + n], ye, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.grad[start : start + n], xe.grad, rtol=1e-5, atol=1e-6)
        for k in ("w1", "w2", "w3"):
            expect = lin[k].weight.grad if n else torch.zeros_like(lin[k].weight)
            torch.testing.assert_close(getattr(fe, k).grad[e], expect, rtol=1e-4, atol=1e-5)
        start += n


def test_grouped_experts_close_to_high_precision_and_save_fp8():
    ref, fe = _experts()
    counts = torch.tensor([100, 3, 0, 150])
    x = torch.randn(253, 160)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ref.forward_sorted(xa, counts)
    yb, saved = _saved(lambda: fe.forward_sorted(xb, counts))
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    # two chained FP8 GEMMs (w1/w3 then w2): errors compound to several percent, well under 2 x 2^-4
    errs = [rel(yb, ya), rel(xb.grad, xa.grad)] + [
        rel(getattr(fe, k).grad, getattr(ref, k).grad) for k in ("w1", "w2", "w3")
    ]
    assert all(0.005 < e < 0.125 for e in errs), errs
    fp8_inputs = {t.data_ptr() for t in saved if t.dtype == FP8_DTYPE}
    assert len(fp8_inputs) == 2  # x (shared by w1 and w3) and h (input of w2), both in FP8


def test_grouped_experts_keep_parameters_and_handle_empty_batches():
    ref, fe = _experts()
    assert isinstance(fe, GroupedExperts)
    assert fe.state_dict().keys() == ref.state_dict().keys()
    y = fe.forward_sorted(torch.zeros(0, 160), torch.zeros(4, dtype=torch.long))
    assert y.shape == (0, 160)
    with pytest.raises(ValueError, match="counts has 3 entries"):
        fe.forward_sorted(torch.zeros(2, 160), torch.tensor([1, 1, 0]))
