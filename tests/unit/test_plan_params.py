"""Planner parameter counts against the model itself (meta device, and gradients of a real forward)."""

import pytest
import torch

from dsv3.config import ModelConfig, preset_names
from dsv3.model import Transformer
from dsv3.plan.kvcache import kv_bytes_per_token, per_head_kv_bytes_per_token
from dsv3.plan.params import count_params, param_inventory


@pytest.mark.parametrize("name", preset_names())
def test_inventory_equals_meta_model(name):
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    got = [(s.name, s.shape) for s in param_inventory(cfg)]
    want = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert got == want
    counts = count_params(cfg)
    assert counts.total == model.num_params(exclude_mtp=True)
    assert counts.total_with_mtp == model.num_params(exclude_mtp=False)
    parts = ("embedding", "head", "attention", "dense_mlp", "moe_routed", "moe_shared", "moe_gate", "norms")
    assert sum(getattr(counts, k) for k in parts) == counts.total
    assert counts.total + counts.mtp == counts.total_with_mtp
    assert sum(counts.per_block) + counts.embedding + counts.head + cfg.hidden_size == counts.total_with_mtp


def test_tied_embeddings_counted_once():
    cfg = ModelConfig.from_preset("debug").replace(tie_word_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert [s.name for s in param_inventory(cfg)] == [n for n, _ in model.named_parameters()]
    assert count_params(cfg).total == model.num_params()


def test_v3_headline_figures():
    cfg = ModelConfig.from_preset("deepseek-v3-671b")
    c = count_params(cfg)
    assert c.total == 671_026_404_352  # "671B"
    assert round(c.active / 1e9) == 37  # "37B activated"
    assert 36e9 < c.active < 37.5e9
    assert kv_bytes_per_token(cfg) == 70_272  # 61 layers * 576 values * 2 bytes
    assert per_head_kv_bytes_per_token(cfg) == 61 * 128 * (192 + 128) * 2
    assert kv_bytes_per_token(cfg, "fp8") == 35_136
    assert 2.4e9 < count_params(ModelConfig.from_preset("deepseek-v2-lite-16b")).active < 2.5e9  # "2.4B"


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_active_params_are_what_one_token_touches(scoring):
    """Parameters with a nonzero gradient of the last token's logits = activated count.

    Two tokens, because attention over a single key passes no gradient to q and k. In the debug config the
    only MoE main layer is the last one, so the earlier token reaches the last logits through attention
    alone and adds just its embedding row. The gate reads all E rows; with sigmoid scores only the k chosen
    get a gradient (softmax scores couple them all)."""
    cfg = ModelConfig.from_preset("debug")
    if scoring == "softmax":
        cfg = cfg.replace(
            scoring_func="softmax",
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            q_lora_rank=None,
            norm_topk_prob=False,
        )
    torch.manual_seed(0)
    model = Transformer(cfg)
    for b in model.buffers():
        if b.dim() == 1 and b.numel() == cfg.n_routed_experts:
            b.normal_(0, 0.1)  # a nonzero balance bias must not change what counts as activated
    assert [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)] == [False, True]
    out = model(torch.tensor([[5, 7]]), with_mtp=False)
    out.logits[:, -1].sum().backward()
    touched = sum(int((p.grad != 0).sum()) for p in model.parameters() if p.grad is not None)
    E, K, D = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    untouched_gate_rows = E - K if scoring == "sigmoid" else 0
    assert touched - D + n_moe * untouched_gate_rows * D == count_params(cfg).active
