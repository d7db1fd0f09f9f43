"""Pipeline stages cut from the model (single process) and the I/W weight-gradient split."""

from __future__ import annotations

import copy

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.model import Transformer, lm_loss
from dsv3.parallel.pipeline.stage import build_stages, combine_losses, loss_row, sequential_step, split_layers
from dsv3.parallel.pipeline.wgrad import (
    SplitGroupedExperts,
    SplitLinear,
    WeightGradStore,
    enable_weight_grad_split,
)


def _config(**kw) -> ModelConfig:
    return ModelConfig.from_preset("debug").replace(num_hidden_layers=4, **kw)


def _batch(cfg: ModelConfig, b: int = 2, t: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, cfg.vocab_size, (b, t), generator=g), torch.randint(
        0, cfg.vocab_size, (b, t), generator=g
    )


def _cos_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(1 - (a @ b) / (a.norm() * b.norm()))


def test_split_layers():
    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert split_layers(5, 2, [2, 3]) == [range(0, 2), range(2, 5)]
    with pytest.raises(ValueError, match="not divisible into 3 pipeline stages"):
        split_layers(8, 3)
    with pytest.raises(ValueError, match="sums to 4"):
        split_layers(5, 2, [2, 2])
    with pytest.raises(ValueError, match="counts >= 1"):
        split_layers(4, 2, [4, 0])


@pytest.mark.parametrize("num_stages", [1, 2, 4])
def test_chained_stages_reproduce_the_model(num_stages):
    """Stages run one after another: the loss is bit-identical to the model's, gradients match."""
    cfg = _config()
    model = Transformer(cfg)
    ref = copy.deepcopy(model)
    ids, labels = _batch(cfg)
    stages = build_stages(model, list(range(num_stages)), num_stages)
    assert list(stages[0].named_parameters())[0][0] == "embed.weight"
    h = (ids,)
    for s in range(num_stages):
        out = stages[s](*h, input_ids=ids)
        if s < num_stages - 1:
            assert len(out) == (1 if stages[s + 1].moe_before == 0 else 2)
            h = out
    lo = lm_loss(out, labels, mtp_weight=0.3, balance_alpha=0.01)
    lr = lm_loss(ref(ids), labels, mtp_weight=0.3, balance_alpha=0.01)
    assert torch.equal(lo.loss, lr.loss) and torch.equal(lo.balance_loss, lr.balance_loss)
    lo.loss.backward()
    lr.loss.backward()
    ref_grads = dict(ref.named_parameters())
    seen = set()
    for st in stages.values():
        for name, p in st.named_parameters():
            seen.add(name)
            assert _cos_dist(p.grad, ref_grads[name].grad) < 1e-10, name
    assert seen == set(ref_grads)  # every parameter lives on some stage, under the model's name


def test_last_stage_shares_the_embedding_and_counts_experts():
    cfg = _config(tie_word_embeddings=True)
    model = Transformer(cfg)
    stages = build_stages(model, [0, 1], 2)
    assert stages[1].embed is stages[0].embed is model.embed
    names = dict(stages[1].named_parameters())
    assert "embed.weight" in names and "head.weight" not in names  # tied: one tensor, one name
    ids, _ = _batch(cfg)
    with torch.no_grad():
        out = stages[1](*stages[0](ids), input_ids=ids)
    assert out.logits.shape == (2, 8, cfg.vocab_size) and len(out.mtp_logits) == 1
    # stage 0 holds layers 0 (dense) and 1 (MoE); stage 1 layers 2, 3 (MoE) and the MTP block (MoE)
    assert stages[0].expert_counts.shape == (1, 8) and stages[1].expert_counts.shape == (3, 8)
    tokens = 2 * 8 * cfg.num_experts_per_tok
    assert stages[1].expert_counts.sum(1).tolist() == [tokens] * 3
    stages[1].reset_expert_counts()
    assert stages[1].expert_counts.sum() == 0


def test_stage_errors():
    cfg = _config()
    model = Transformer(cfg)
    with pytest.raises(ValueError, match="out of range"):
        build_stages(model, [4], 4)
    with pytest.raises(ValueError, match="not divisible"):
        build_stages(model, [0], 3)
    last = build_stages(model, [1], 2)[1]
    h = torch.zeros(1, 4, cfg.hidden_size)
    with pytest.raises(ValueError, match="needs input_ids"):
        last(h, torch.zeros(1, 2))


def test_sequential_reference_combines_microbatches():
    cfg = _config()
    model = Transformer(cfg)
    ids, labels = _batch(cfg, b=4)
    res = sequential_step(model, ids, labels, 2)
    rows = [loss_row(lm_loss(model(x), y)) for x, y in zip(ids.chunk(2), labels.chunk(2))]
    assert torch.equal(res.losses, torch.stack(rows))
    assert torch.equal(res.loss, combine_losses(torch.stack(rows))[0])
    assert set(res.parts) == {"loss", "main_loss", "mtp_loss", "balance_loss"}
    with pytest.raises(ValueError, match="not divisible into 3 micro-batches"):
        sequential_step(model, ids, labels, 3)


def test_weight_gradients_are_deferred_and_then_match():
    cfg = _config()
    model = Transformer(cfg)
    ref = copy.deepcopy(model)
    store = WeightGradStore()
    n = enable_weight_grad_split(model, store)
    assert n == sum(isinstance(m, SplitLinear | SplitGroupedExperts) for m in model.modules()) > 10
    ids, labels = _batch(cfg)
    lo = lm_loss(model(ids), labels, balance_alpha=0.01)
    lr = lm_loss(ref(ids), labels, balance_alpha=0.01)
    assert torch.equal(lo.loss, lr.loss)  # forward numerics unchanged
    with store.defer("k"):
        lo.loss.backward()
    assert model.layers[1].ffn.experts.w1.grad is None and model.layers[0].attn.wo.weight.grad is None
    assert model.layers[0].attn_norm.weight.grad is not None  # small weights are done in I
    assert store.run("k") > 10 and len(store) == 0
    lr.loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert not p.grad.requires_grad
        assert _cos_dist(p.grad, ref_grads[name].grad) < 1e-10, name
    # outside defer(), the split layers behave like ordinary ones
    model.zero_grad()
    lm_loss(model(ids), labels).loss.backward()
    assert model.layers[1].ffn.experts.w2.grad is not None
    with pytest.raises(ValueError, match="no deferred weight gradients"):
        store.run("k")


def test_store_refuses_a_key_twice():
    store = WeightGradStore()
    with store.defer(1):
        pass
    with pytest.raises(ValueError, match="already pending"), store.defer(1):
        pass
    store.clear()
    assert len(store) == 0


def test_without_capture_the_split_layers_run_plain_autograd():
    """The runtime records deferrable nodes only for chunks the schedule splits; a full B stays native."""
    cfg = _config()
    model = Transformer(cfg)
    store = WeightGradStore()
    enable_weight_grad_split(model, store)
    ids, labels = _batch(cfg)
    store.capture = False
    loss = lm_loss(model(ids), labels).loss
    store.capture = True
    with store.defer("k"):
        loss.backward()
    assert model.layers[1].ffn.experts.w1.grad is not None and model.layers[0].attn.wo.weight.grad is not None
    assert store.run("k") == 0
