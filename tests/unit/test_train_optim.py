"""AdamW: matches torch's AdamW with FP32 moments, BF16 moments stay BF16 and close, param groups."""

from __future__ import annotations

import torch

from dsv3.config import ModelConfig
from dsv3.model import Transformer
from dsv3.train.optim import AdamW, clip_grads, grad_norm, param_groups


def _run(opt_factory, steps=5):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("debug"))
    opt = opt_factory(model)
    x = torch.randint(0, 320, (2, 16))
    for _ in range(steps):
        model(x).logits.float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_matches_torch_adamw():
    ours, _ = _run(lambda m: AdamW(param_groups(m, 0.1), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1))
    ref, _ = _run(
        lambda m: torch.optim.AdamW(param_groups(m, 0.1), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    )
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_moments():
    ours, opt = _run(lambda m: AdamW(param_groups(m, 0.1), lr=1e-2, moments_dtype=torch.bfloat16))
    ref, _ = _run(lambda m: AdamW(param_groups(m, 0.1), lr=1e-2))
    st = opt.state[ours.embed.weight]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    assert ours.embed.weight.dtype == torch.float32  # master weights stay FP32
    diffs = [(a - b).abs().max() for a, b in zip(ours.parameters(), ref.parameters())]
    assert max(diffs) < 5e-3 and max(diffs) > 0
    sd = opt.state_dict()  # a reload keeps the moments in BF16
    opt2 = AdamW(param_groups(ours, 0.1), lr=1e-2, moments_dtype=torch.bfloat16)
    opt2.load_state_dict(sd)
    assert opt2.state[ours.embed.weight]["exp_avg"].dtype == torch.bfloat16


def test_param_groups_exclude_norms_biases_embeddings():
    model = Transformer(ModelConfig.from_preset("debug"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "embed.weight" in nd and "norm.weight" in nd and "layers.0.attn.kv_norm.weight" in nd
    assert "head.weight" in d and "layers.1.ffn.experts.w1" in d and "layers.1.ffn.gate.weight" in d
    assert len(d) + len(nd) == len(list(model.parameters()))


def test_grad_norm_and_clip():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    n = grad_norm([p])
    assert float(n) == 5.0
    clip_grads([p], 1.0, n)
    assert float(p.grad.norm()) == 1.0 or abs(float(p.grad.norm()) - 1.0) < 1e-5
    p.grad = torch.tensor([float("nan"), 0, 0, 0])
    assert not torch.isfinite(grad_norm([p]))
