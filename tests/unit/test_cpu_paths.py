"""The CPU speed paths (`dsv3.cpu`) against the reference layers they replace: each swapped module gives
the reference's outputs (and gradients, where it trains), follows in-place weight updates, and steps
aside where it does not apply. Also: model/ holds no device, grad-mode or engine branches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import dsv3.model
from dsv3 import ModelConfig, Transformer
from dsv3.cpu import (
    EXPERT_BACKENDS,
    apply_cpu_inference,
    apply_cpu_training,
    cpu_attention,
    expert_backends,
    padded_slots,
    set_expert_backend,
)
from dsv3.cpu.attention import MATMUL_ATTN_MAX
from dsv3.cpu.decode import BagMoE, FusedRMSNorm, PackedGEMV, PackedMLP, RopeTableTransformer
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.mla import MLA, sdpa_attention
from dsv3.model.moe import GroupedExperts, expert_counts


def _debug(**kw) -> ModelConfig:
    return ModelConfig.from_preset("debug").replace(**kw)


def test_model_package_has_no_device_grad_or_engine_branches():
    """model/ is the reference: no branch on device type, grad or inference mode, no engine flags."""
    pattern = re.compile(
        r"device\.type ?[!=]=|is_cuda|is_cpu|is_grad_enabled|is_inference_mode_enabled|inference_mode"
        r"|decode_|hasattr\(|getattr\("
    )
    root = Path(dsv3.model.__file__).parent
    hits = [
        f"{f.name}:{i}: {line.strip()}"
        for f in sorted(root.glob("*.py"))
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits
    lines = sum(len(f.read_text().splitlines()) for f in root.glob("*.py") if f.name != "__init__.py")
    assert lines < 1000, lines


def test_padded_experts_equal_grouped_mm_with_gradients():
    """The padded-bmm layout gives the grouped GEMM's outputs and gradients; skewed routing (padding
    over 2x the rows) falls back to grouped_mm unless the padded layout is small; the cap is aligned."""
    torch.manual_seed(0)
    E, D, inter, N, K = 6, 16, 8, 40, 2
    ex = GroupedExperts(E, D, inter)
    for p in ex.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(N, D, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    w = torch.rand(N, K)
    counts = expert_counts(idx.reshape(-1), E)
    slot, cap = padded_slots(counts, N * K)
    assert cap % 128 == 0 and slot.unique().numel() == N * K
    skewed = torch.tensor([N * K - E + 1] + [1] * (E - 1))
    assert padded_slots(skewed, N * K, small=0, align=1) is None  # padding > 2x the rows
    assert padded_slots(skewed, N * K) is not None  # ... but a small layout pads anyway

    def run():
        out = ex(x, w, idx)
        grads = torch.autograd.grad(out.square().sum(), [x, *ex.parameters()])
        return out, grads

    grouped, g_grouped = run()
    assert set_expert_backend(ex, "padded") == 1 and ex.backend == "padded"
    padded, g_padded = run()
    torch.testing.assert_close(padded, grouped, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_padded, g_grouped, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # few rows: the active-experts backend
        set_expert_backend(ex, "active")
        torch.testing.assert_close(ex(x[:3], w[:3], idx[:3]), grouped[:3], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expert backend must be one of"):
        set_expert_backend(ex, "fast")


def test_training_speed_paths_name_their_backend():
    model = Transformer(_debug())
    assert expert_backends(model) == ["grouped_mm"]
    apply_cpu_training(model)
    assert expert_backends(model) == ["padded"]
    assert all(m.attention is cpu_attention for m in model.modules() if isinstance(m, MLA))
    assert set(EXPERT_BACKENDS) == {"grouped_mm", "padded", "active"}


def test_cpu_attention_matches_the_reference_core():
    """cpu_attention (BF16 GEMMs with an FP32 softmax under BF16 autocast; FP32 padded SDPA otherwise)
    against `sdpa_attention` on the same inputs: outputs and gradients agree, causal (square and with
    the new tokens last) and with an explicit mask."""
    torch.manual_seed(0)
    B, S, H, Dqk, Dv = 2, 12, 3, 24, 16
    inputs = (torch.randn(B, S, H, Dqk), torch.randn(B, S, H, Dqk), torch.randn(B, S, H, Dv))
    explicit = (torch.rand(B, S, S) > 0.3) | torch.eye(S, dtype=torch.bool)  # each row sees something
    assert B * H * S * S <= MATMUL_ATTN_MAX
    for bf16 in (False, True):
        for mask, s in ((None, S), (explicit, S), (None, 5)):
            outs = []
            for fn in (sdpa_attention, cpu_attention):
                q, k, v = [t.clone().requires_grad_() for t in inputs]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    o = fn(q[:, -s:], k, v, mask, 0.3)
                o.float().square().sum().backward()
                outs.append((o.float(), [q.grad, k.grad, v.grad]))
            (o_ref, g_ref), (o_new, g_new) = outs
            tol = 0.02 if bf16 else 1e-5
            torch.testing.assert_close(o_new, o_ref, rtol=tol, atol=tol)
            for a, b in zip(g_new, g_ref):
                assert (a - b).norm() <= tol * b.norm()


@pytest.mark.parametrize("n_shared", [0, 1, 2])
@torch.no_grad()
def test_bag_moe_equals_grouped_experts(n_shared):
    """Embedding-bag experts (shared ones folded in as gate-1 slots) = the reference MoE, for any thread
    count; the tables follow in-place weight updates; autograd and many tokens take the reference."""
    cfg = _debug(n_shared_experts=n_shared)
    model = Transformer(cfg).eval()
    layer = model.moe_layers()[0]
    ref_layer = Transformer(cfg).eval().moe_layers()[0]
    ref_layer.load_state_dict(layer.state_dict())
    apply_cpu_inference(model)
    assert type(layer) is BagMoE
    threads = torch.get_num_threads()
    try:
        for N, t in ((1, 1), (1, 2), (1, 3), (3, 2), (3, 4), (8, 2)):  # fewer tokens than threads: split
            torch.set_num_threads(t)
            x = torch.randn(1, N, cfg.hidden_size)
            assert layer.tables(x.view(N, -1)) is not None
            torch.testing.assert_close(layer(x)[0], ref_layer(x)[0], atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
    layer.experts.w2.mul_(2)
    ref_layer.experts.w2.mul_(2)
    if n_shared:
        layer.shared_experts.w2.weight.mul_(2)
        ref_layer.shared_experts.w2.weight.mul_(2)
    torch.testing.assert_close(layer(x)[0], ref_layer(x)[0], atol=1e-5, rtol=1e-5)
    assert layer.tables(torch.randn(40, cfg.hidden_size)) is None


@pytest.mark.parametrize("slabs", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gemv_equals_linear(dtype, slabs):
    """PackedGEMV = the Linears it packs, for any thread count; it follows in-place weight updates and
    steps aside under autograd and for long inputs."""
    torch.manual_seed(0)
    a, b = nn.Linear(64, 96, bias=False).to(dtype), nn.Linear(64, 30, bias=False).to(dtype)
    pack = PackedGEMV(slabs=slabs)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            with torch.no_grad():
                for shape in ((1, 1, 64), (8, 64), (2, 3, 64)):
                    x = torch.randn(shape, dtype=dtype)
                    y = pack(x, a, b)
                    assert y is not None and y.shape == (*shape[:-1], 126)
                    torch.testing.assert_close(y, torch.cat([a(x), b(x)], dim=-1), **tol)
    finally:
        torch.set_num_threads(threads)
    x = torch.randn(2, 64, dtype=dtype)
    with torch.no_grad():
        a.weight.mul_(-3)
        torch.testing.assert_close(pack(x, a), a(x), **tol)
        assert pack(torch.randn(40, 64, dtype=dtype), a) is None  # a GEMM, not a GEMV
    assert pack(x, a) is None  # autograd on
    mlp = MLP(64, 48).to(dtype)
    with torch.no_grad():
        ref = mlp(x)
        apply_cpu_inference_to(mlp)
        assert type(mlp) is PackedMLP
        torch.testing.assert_close(mlp(x), ref, **tol)
        assert mlp.gemv13._packed.value is not None


def apply_cpu_inference_to(mlp: MLP) -> None:
    mlp.__class__ = PackedMLP
    mlp.setup()


def test_fused_rmsnorm_matches_formula():
    """FP32 inference (LayerNorm over [x, -x] on a few rows, rms_norm on many) = the reference formula
    up to FP32 summation order; it follows in-place weight updates; autograd runs the reference."""
    torch.manual_seed(0)
    for D in (16, 64, 256, 1024):
        norm = RMSNorm(D)
        with torch.no_grad():
            norm.weight.normal_()
        for scale in (1e-3, 1.0, 100.0):
            x = torch.randn(2, 3, D) * scale
            ref = norm(x).detach()
            norm.__class__ = FusedRMSNorm
            norm.setup()
            with torch.no_grad():
                y = norm(x)
                assert norm.weight2.value is not None
                torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
                many = torch.randn(64, D)
                assert torch.equal(norm(many), RMSNorm.forward(norm, many))  # rms_norm: bitwise
            torch.testing.assert_close(norm(x), ref, rtol=0, atol=0)  # autograd: the reference
            norm.__class__ = RMSNorm
    norm.__class__ = FusedRMSNorm
    with torch.no_grad():
        norm.weight.mul_(2)
        torch.testing.assert_close(norm(x), 2 * ref, rtol=1e-5, atol=1e-5)


def test_rope_table_equals_direct_computation():
    """The RoPE table gives the values computed for the positions asked; positions past the table and
    autograd compute them directly."""
    cfg = _debug(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    model = Transformer(cfg)
    positions = torch.tensor([[0, 5, 17], [cfg.max_position_embeddings - 1, 3, 2]])
    direct = model.rope(positions, torch.float32)
    far_ref = model.rope(torch.tensor([[cfg.max_position_embeddings + 7]]), torch.float32)
    apply_cpu_inference(model)
    assert type(model) is RopeTableTransformer
    with torch.no_grad():
        looked_up = model.rope(positions, torch.float32)
        assert model.rope_table.value is not None
        far = model.rope(torch.tensor([[cfg.max_position_embeddings + 7]]), torch.float32)
    for a, b in zip(direct, looked_up):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(far_ref, far):
        assert torch.equal(a, b)


def test_engine_applies_the_inference_paths_and_matches_the_reference():
    """The engine swaps the speed paths in at setup; greedy decode equals a full re-forward of an
    untouched copy of the model, and the state dict is unchanged by the swap."""
    from dsv3.inference import LLM, SamplingParams

    torch.manual_seed(0)
    cfg = _debug()
    model = Transformer(cfg).eval()
    ref = Transformer(cfg).eval()
    ref.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    llm = LLM(model, max_batch_size=2, max_seq_len=64)
    assert type(model) is RopeTableTransformer and list(model.state_dict()) == keys
    prompt = torch.randint(2, cfg.vocab_size, (7,)).tolist()
    out = llm.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        greedy = ref(ids, with_mtp=False).logits[0, len(prompt) - 1 : -1].argmax(-1)
    assert greedy.tolist() == out.token_ids


def test_padded_experts_chunked_layout_for_skewed_routing():
    """Skewed routing takes the chunked layout (bounded shapes): outputs and gradients equal the
    grouped GEMM's, and the chunk count is a multiple of CHUNK_ALIGN."""
    from dsv3.cpu.experts import CHUNK, CHUNK_ALIGN, chunked_slots

    torch.manual_seed(0)
    E, D, inter, N, K = 4, 16, 8, 300, 1
    ex = GroupedExperts(E, D, inter)
    for p in ex.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(N, D, requires_grad=True)
    idx = torch.zeros(N, K, dtype=torch.long)
    idx[:7, 0] = torch.tensor([1, 1, 2, 3, 3, 3, 1])  # expert 0 takes most rows
    w = torch.rand(N, K)
    counts = expert_counts(idx.reshape(-1), E)
    assert padded_slots(counts, N * K) is None  # too skewed for [E, cap]
    slot, chunk_expert = chunked_slots(counts, N * K)
    assert chunk_expert.numel() % CHUNK_ALIGN == 0 and slot.unique().numel() == N * K
    assert int(slot.max()) < chunk_expert.numel() * CHUNK

    def run():
        out = ex(x, w, idx)
        return out, torch.autograd.grad(out.square().sum(), [x, *ex.parameters()])

    ref, g_ref = run()
    set_expert_backend(ex, "padded")
    got, g_got = run()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_rmsnorm_equals_reference_with_gradients(dtype):
    """The lean-backward RMSNorm gives the reference's outputs (bitwise) and its gradients (to FP32
    rounding; BF16 inputs round dx to BF16 in both)."""
    from dsv3.cpu import TrainingRMSNorm

    torch.manual_seed(0)
    ref = RMSNorm(64)
    with torch.no_grad():
        ref.weight.normal_()
    x = (torch.randn(3, 5, 64) * 3).to(dtype)
    outs = []
    for cls in (RMSNorm, TrainingRMSNorm):
        ref.__class__ = cls
        xi = x.clone().requires_grad_()
        dy = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
        y = ref(xi)
        gx, gw = torch.autograd.grad(y, [xi, ref.weight], dy.to(y.dtype))
        outs.append((y, gx, gw))
    (y0, gx0, gw0), (y1, gx1, gw1) = outs
    assert torch.equal(y0, y1) and gx1.dtype == gx0.dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gx1, gx0, rtol=tol, atol=tol)
    torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-5)
