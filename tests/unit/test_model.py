"""The model: shapes, MLA absorbed vs naive attention and incremental decoding, rope layouts, MTP, loss,
grouped experts, and the parameter counts of the 671B preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3 import ModelConfig, Transformer, lm_loss
from dsv3.model.moe import GroupedExperts
from dsv3.model.rope import apply_rope, rope_cos_sin


def _debug(**kw) -> ModelConfig:
    return ModelConfig.from_preset("debug").replace(**kw)


class LatentCache:
    """The smallest cache the model accepts: appends latents per layer; mask None means causal."""

    def __init__(self, absorb: bool):
        self.absorb = absorb
        self.mask: torch.Tensor | None = None
        self.c: dict[int, torch.Tensor] = {}
        self.pe: dict[int, torch.Tensor] = {}

    def update(self, layer_id: int, c: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_id in self.c:
            c, pe = torch.cat([self.c[layer_id], c], 1), torch.cat([self.pe[layer_id], pe], 1)
        self.c[layer_id], self.pe[layer_id] = c, pe
        return c, pe


def test_forward_shapes_and_router_stats():
    cfg = _debug()
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    out = model(ids)
    assert out.logits.shape == (2, 10, cfg.vocab_size)
    assert out.hidden.shape == (2, 10, cfg.hidden_size)
    assert len(out.mtp_logits) == cfg.num_nextn_predict_layers
    assert out.mtp_logits[0].shape == out.logits.shape
    assert len(out.router_stats) == len(model.moe_layers()) == 2  # one main MoE layer + the MTP block's
    for s in out.router_stats:
        assert s.counts.sum().item() == 2 * 10 * cfg.num_experts_per_tok
    assert model(ids, with_mtp=False).mtp_logits == []
    with torch.inference_mode():  # counts are tallied on first access, here outside inference mode
        stats = model(ids, with_mtp=False).router_stats
    assert torch.equal(stats[0].counts, out.router_stats[0].counts)


@torch.no_grad()
def test_absorbed_equals_naive_and_full_forward():
    """Prefill then token-by-token decode through both attention paths equals one full forward."""
    cfg = _debug(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    full = model(ids, with_mtp=False).logits
    for absorb in (False, True):
        cache = LatentCache(absorb)
        steps = [model(ids[:, :5], cache=cache).logits]
        for t in range(5, 9):
            pos = torch.full((2, 1), t)
            if t == 7:  # an explicit mask gives the same result as the implicit causal one
                cache.mask = torch.ones(2, 1, t + 1, dtype=torch.bool)
            steps.append(model(ids[:, t : t + 1], positions=pos, cache=cache).logits)
            cache.mask = None
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_absorbed_equals_naive_with_padding_mask():
    cfg = _debug()
    attn = Transformer(cfg).layers[0].attn
    B, S, T, H = 2, 3, 7, cfg.num_attention_heads
    q_nope = torch.randn(B, S, H, cfg.qk_nope_head_dim)
    q_pe = torch.randn(B, S, H, cfg.qk_rope_head_dim)
    c, pe = torch.randn(B, T, cfg.kv_lora_rank), torch.randn(B, T, cfg.qk_rope_head_dim)
    mask = torch.rand(B, S, T) > 0.3
    mask[..., 0] = True  # every query sees something
    naive = attn.attend_naive(q_nope, q_pe, c, pe, mask)
    absorbed = attn.attend_absorbed(q_nope, q_pe, c, pe, mask)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-5)


def test_rope_layouts_give_the_same_scores():
    """Interleaved pairs and rotate_half pairs are one permutation apart: q.k is unchanged."""
    R = 8
    positions, inv_freq = torch.arange(5).expand(1, 5), torch.rand(R // 2)
    cs_half = rope_cos_sin(positions, inv_freq, 1.0, torch.float32, interleave=False)
    cs_inter = rope_cos_sin(positions, inv_freq, 1.0, torch.float32, interleave=True)
    q, k = torch.randn(1, 5, 2, R), torch.randn(1, 5, 2, R)
    perm = torch.stack(
        [torch.arange(R // 2), torch.arange(R // 2) + R // 2], 1
    ).flatten()  # half -> interleaved
    half = (apply_rope(q, *cs_half, False) * apply_rope(k, *cs_half, False)).sum(-1)
    inter = (apply_rope(q[..., perm], *cs_inter, True) * apply_rope(k[..., perm], *cs_inter, True)).sum(-1)
    torch.testing.assert_close(half, inter)
    # and rotation preserves norms
    torch.testing.assert_close(apply_rope(q, *cs_inter, True).norm(dim=-1), q.norm(dim=-1))


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_matches_the_pairwise_rotation_bitwise(interleave):
    """apply_rope's x * cos + partner(x) * sin is the textbook (a cos - b sin, b cos + a sin), bit for bit."""
    R, positions, inv_freq = 16, torch.arange(7).expand(2, 7), torch.rand(8)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 7, 3, R).to(dtype)
        freqs = positions.float()[..., None] * inv_freq
        c, s = (freqs.cos() * 0.9).to(dtype)[:, :, None], (freqs.sin() * 0.9).to(dtype)[:, :, None]
        a, b = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., : R // 2], x[..., R // 2 :])
        ra, rb = a * c - b * s, b * c + a * s
        want = torch.stack((ra, rb), -1).flatten(-2) if interleave else torch.cat((ra, rb), -1)
        got = apply_rope(x, *rope_cos_sin(positions, inv_freq, 0.9, dtype, interleave), interleave)
        assert torch.equal(got, want)


@torch.no_grad()
def test_mtp_concatenates_embedding_first():
    cfg = _debug()
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    out = model(ids)
    m = model.mtp[0]
    emb = model.embed(torch.roll(ids, -1, 1))
    x = F.linear(torch.cat([m.enorm(emb), m.hnorm(out.hidden)], -1), m.eh_proj.weight)
    cos, sin = model.rope(torch.arange(6).expand(1, 6), x.dtype)
    h, _ = m.block(x, cos, sin)
    torch.testing.assert_close(out.mtp_logits[0], model.head(m.norm(h)))


def test_lm_loss_parts():
    cfg = _debug()
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    out = model(ids)
    loss = lm_loss(out, labels, mtp_weight=0.3, balance_alpha=0.01)
    torch.testing.assert_close(
        loss.loss.detach(), loss.main_loss + 0.3 * loss.mtp_loss + 0.01 * loss.balance_loss
    )
    V = cfg.vocab_size
    torch.testing.assert_close(loss.main_loss, F.cross_entropy(out.logits.reshape(-1, V), labels.reshape(-1)))
    assert loss.balance_loss > 0 and loss.mtp_loss > 0
    loss.loss.backward()
    assert model.layers[1].ffn.gate.weight.grad is not None  # the balance loss reaches the router


def test_grouped_experts_match_a_loop():
    torch.manual_seed(0)
    E, D, inter, N, K = 5, 16, 8, 11, 2
    ex = GroupedExperts(E, D, inter)
    for p in ex.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(N, D)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    idx[:, 0] = 1  # some experts get no tokens at all
    w = torch.rand(N, K)
    ref = torch.zeros(N, D)
    for n in range(N):
        for j in range(K):
            e = idx[n, j]
            ref[n] += w[n, j] * (F.silu(x[n] @ ex.w1[e].T) * (x[n] @ ex.w3[e].T)) @ ex.w2[e].T
    torch.testing.assert_close(ex(x, w, idx), ref, atol=1e-5, rtol=1e-5)


def test_671b_parameter_counts():
    """REFERENCE.md: 671B total, 37B activated per token (main model, MTP excluded)."""
    cfg = ModelConfig.from_preset("deepseek-v3-671b")
    with torch.device("meta"):
        model = Transformer(cfg)
    total = model.num_params()
    assert abs(total - 671.0e9) <= 0.005 * 671.0e9
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert n_moe == 58
    activated = total - (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert * n_moe
    assert abs(activated - 37e9) <= 0.03 * 37e9
    # the absorbed cache: 576 values per token per layer, 70,272 bytes per token in BF16 over 61 layers
    assert cfg.kv_cache_values_per_token * 2 * cfg.num_hidden_layers == 70_272


def test_init_std():
    cfg = _debug(initializer_range=0.006, hidden_size=256, intermediate_size=512)
    model = Transformer(cfg)
    w = model.layers[0].ffn.w1.weight
    assert abs(w.std().item() - 0.006) < 0.0005
    assert torch.all(model.norm.weight == 1)
    assert torch.all(model.layers[1].ffn.gate.e_score_correction_bias == 0)


@torch.no_grad()
def test_logits_to_keep_selects_positions():
    """logits_to_keep (transformers' convention): N > 0 keeps the last N positions, an index tensor the
    given ones; the hidden states stay whole and the kept logits equal the full ones."""
    torch.manual_seed(0)
    model = Transformer(_debug()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    full = model(ids, with_mtp=False)
    last2 = model(ids, with_mtp=False, logits_to_keep=2)
    picked = model(ids, with_mtp=False, logits_to_keep=torch.tensor([0, 5]))
    assert last2.logits.shape[1] == 2 and picked.logits.shape[1] == 2
    torch.testing.assert_close(last2.logits, full.logits[:, -2:])
    torch.testing.assert_close(picked.logits, full.logits[:, [0, 5]])
    torch.testing.assert_close(last2.hidden, full.hidden)


@pytest.mark.parametrize("cpu_paths", [False, True])
def test_packed_samples_equal_samples_one_by_one(cpu_paths):
    """Sample masking: samples packed into one row (segment ids, positions restarting at 0) give the
    loss and gradients of the same samples run one by one (fp32, <= 1e-5), in the reference model and
    with the CPU training paths; padding and masked labels contribute nothing."""
    from dsv3.cpu import apply_cpu_training

    torch.manual_seed(0)
    cfg = _debug(num_nextn_predict_layers=0)
    model = Transformer(cfg)
    if cpu_paths:
        apply_cpu_training(model)
    lengths = [5, 7, 4]
    samples = [torch.randint(0, cfg.vocab_size, (n,)) for n in lengths]
    pad = 3
    ids = torch.cat(samples + [torch.zeros(pad, dtype=torch.long)])[None]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(pad, dtype=torch.long)])[None]

    def labels_of(x: torch.Tensor) -> torch.Tensor:
        y = torch.roll(x, -1)
        y[-1] = -100  # the last token of a sample predicts nothing
        return y

    labels = torch.cat([labels_of(s) for s in samples] + [torch.full((pad,), -100)])[None]
    labels[0, 2] = -100  # a masked (prompt) token inside a sample
    n_valid = int((labels != -100).sum())
    packed = lm_loss(model(ids, positions=pos, segment_ids=seg), labels, 0.0).loss * n_valid
    g_packed = torch.autograd.grad(packed, list(model.parameters()), allow_unused=True)
    total = 0
    start = 0
    for s in samples:
        y = labels[:, start : start + len(s)]
        start += len(s)
        total = total + lm_loss(model(s[None]), y, 0.0).loss * int((y != -100).sum())
    g_one = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(packed, total, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_packed, g_one):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
