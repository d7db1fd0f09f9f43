"""Residual dropout hooks: active in training mode only, on every block including MTP, reproducible."""

from __future__ import annotations

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.model import Transformer
from dsv3.train.regularize import add_residual_dropout


def test_dropout_only_in_training_and_seeded():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("debug"))
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        ref = model.eval()(x).logits
        handles = add_residual_dropout(model, 0.5)
        assert len(handles) == 2 * 3  # (attn, ffn) x (2 layers + 1 MTP block)
        assert torch.equal(model.eval()(x).logits, ref)  # eval: untouched
        model.train()
        torch.manual_seed(1)
        a = model(x).logits
        b = model(x).logits
        torch.manual_seed(1)
        c = model(x).logits
    assert not torch.equal(a, ref) and not torch.equal(a, b) and torch.equal(a, c)
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert torch.equal(model.train()(x).logits, ref)


def test_zero_and_bad_rates():
    model = Transformer(ModelConfig.from_preset("debug"))
    assert add_residual_dropout(model, 0.0) == []
    with pytest.raises(ValueError, match="dropout"):
        add_residual_dropout(model, 1.0)
