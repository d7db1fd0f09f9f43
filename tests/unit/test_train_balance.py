"""Auxiliary-loss-free bias update: direction, magnitude, every MoE layer, and MaxVio."""

from __future__ import annotations

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.model import Transformer
from dsv3.train.balance import max_violation, update_balance_bias


def test_bias_moves_against_the_load_deviation_in_every_layer():
    model = Transformer(ModelConfig.from_preset("debug"))
    layers = model.moe_layers()
    assert len(layers) == 2  # one main MoE layer + the MTP block
    load = torch.tensor([10.0, 0, 5, 5, 5, 5, 5, 5])  # mean 5: expert 0 over, 1 under, the rest even
    update_balance_bias(layers, [load, load.flip(0)], gamma=0.01)
    b0 = layers[0].gate.e_score_correction_bias
    assert b0.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0, 0, 0])
    assert layers[1].gate.e_score_correction_bias.tolist() == pytest.approx([0, 0, 0, 0, 0, 0, 0.01, -0.01])
    update_balance_bias(layers, [load, load], gamma=0.0)  # switched off: nothing moves
    assert b0.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0, 0, 0])


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("debug"))
    moe = model.moe_layers()[0]
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.1)
        moe.gate.weight[0] += 0.05  # expert 0 is favoured by nearly every token (features have mean 1)
    x = torch.randn(512, 64) + 1.0
    first = None
    for _ in range(300):
        _, idx, _ = moe.gate(x)
        load = torch.bincount(idx.flatten(), minlength=8).float()
        first = max_violation(load) if first is None else first
        update_balance_bias([moe], [load], gamma=0.01)
    assert first > 2.0 and max_violation(load) < 0.25  # from ~2.8 to near balance


def test_max_violation():
    assert max_violation(torch.tensor([4.0, 4, 4, 4])) == 0.0
    assert max_violation(torch.tensor([8.0, 0, 4, 4])) == pytest.approx(1.0)
    assert max_violation(torch.zeros(4)) == 0.0


def test_layer_count_mismatch():
    model = Transformer(ModelConfig.from_preset("debug"))
    with pytest.raises(ValueError, match="MoE layers"):
        update_balance_bias(model.moe_layers(), [torch.zeros(8)], 0.1)
