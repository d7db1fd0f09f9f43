"""LR shape, batch ramp, MTP weight and bias-update-speed schedules as fractions of the run."""

from __future__ import annotations

import math

import pytest

from dsv3.config import TrainConfig
from dsv3.train.schedule import batch_size_at, bias_update_speed_at, lr_at, mtp_weight_at


def test_lr_shape_follows_the_paper():
    c = TrainConfig(steps=10_000, lr=2.2e-4, warmup_frac=0.02)
    lrs = [lr_at(c, s) for s in range(c.steps)]
    assert lrs[0] == pytest.approx(2.2e-4 / 200)  # linear warmup over 2% of the run
    assert lrs[99] == pytest.approx(2.2e-4 / 2)
    assert all(lr == pytest.approx(2.2e-4) for lr in lrs[200:6760])  # constant to 10T/14.8T
    assert lrs[6760 + (9660 - 6760) // 2] == pytest.approx(
        2.2e-4 * (0.1 + 0.9 * 0.5), rel=1e-3
    )  # cosine midpoint
    assert all(a >= b for a, b in zip(lrs[6760:9660], lrs[6761:9661]))  # monotone decay
    assert all(lr == pytest.approx(2.2e-5) for lr in lrs[9660:9887])  # 0.1x tail
    assert all(lr == pytest.approx(7.3e-6, rel=1e-2) for lr in lrs[9887:])  # the last 167B
    assert max(lrs) == pytest.approx(2.2e-4)


def test_lr_short_runs_and_no_warmup():
    c = TrainConfig(steps=3, lr=1.0, warmup_frac=0.0)
    assert [lr_at(c, s) for s in range(3)][0] == 1.0
    c = TrainConfig(steps=1, lr=1.0)
    assert math.isfinite(lr_at(c, 0)) and lr_at(c, 0) > 0


def test_batch_ramp():
    c = TrainConfig(steps=1000, batch_size=100, batch_ramp_start=0.2, batch_ramp_frac=0.1)
    sizes = [batch_size_at(c, s) for s in range(1000)]
    assert sizes[0] == 20 and sizes[50] == 60 and sizes[100:] == [100] * 900
    assert sizes == sorted(sizes)
    assert all(b % 8 == 0 for b in (batch_size_at(c, s, multiple=8) for s in range(1000)))
    assert batch_size_at(c.replace(batch_ramp_start=1.0), 0) == 100


def test_mtp_weight_and_gamma_switches():
    c = TrainConfig(steps=1000)
    assert mtp_weight_at(c, 0) == 0.3 and mtp_weight_at(c, 675) == 0.3 and mtp_weight_at(c, 676) == 0.1
    assert bias_update_speed_at(c, 0) == 0.001 and bias_update_speed_at(c, 965) == 0.001
    assert bias_update_speed_at(c, 966) == 0.0 and bias_update_speed_at(c, 999) == 0.0


def test_bad_schedule_settings_name_the_field():
    with pytest.raises(ValueError, match="decay_start_frac"):
        TrainConfig(decay_start_frac=0.9, decay_end_frac=0.5).validate()
    with pytest.raises(ValueError, match="batch_ramp_start"):
        TrainConfig(batch_ramp_start=0).validate()
