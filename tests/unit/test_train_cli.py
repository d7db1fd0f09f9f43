"""`dsv3 train` settings: key=value overrides reach the right config; bad ones fail before training."""

from __future__ import annotations

import pytest

from dsv3.cli import main
from dsv3.train.cli import build_configs


def test_overrides_reach_model_and_train():
    m, t = build_configs(
        "debug", ["lr=1e-3", "model.hidden_size=32", "n_routed_experts=16", "fim_rate=0"], steps=7
    )
    assert (t.lr, t.steps, t.fim_rate) == (1e-3, 7, 0.0)
    assert (m.hidden_size, m.n_routed_experts) == (32, 16)
    _, t = build_configs("debug", ["balance_alpha=0.01", "moments_dtype=bfloat16", "compile=true"])
    assert t.balance_alpha == 0.01 and t.moments_dtype == "bfloat16" and t.compile is True


@pytest.mark.parametrize(
    "pair, match",
    [
        ("no_such_key=1", "unknown key 'no_such_key'"),
        ("train.hidden_size=3", "unknown key 'train.hidden_size'"),
        ("lr=fast", "invalid value for lr"),
        ("steps=-3", "steps"),
        ("balance_loss=maybe", "balance_loss"),
        ("n_group=3", "n_group"),
        ("lr", "expected key=value"),
    ],
)
def test_bad_overrides_are_rejected_naming_the_key(pair, match):
    with pytest.raises(ValueError, match=match):
        build_configs("debug", [pair])


def test_cli_rejects_before_training(tmp_path, capsys):
    rc = main(["train", "--preset", "debug", "--out", str(tmp_path / "r"), "bogus=1"])
    assert rc == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was started
    rc = main(["train", "--preset", "nope", "--out", str(tmp_path / "r")])
    assert rc == 2 and "unknown preset" in capsys.readouterr().err


def test_layout_keys_set_the_one_parallel_config():
    _, t = build_configs(
        "debug", ["ep=2", "parallel.zero1=false", "train.parallel.pp_schedule=zb1p", "fp8=true"]
    )
    p = t.parallel
    assert (p.ep, p.zero1, p.pp_schedule, p.fp8, p.dp) == (2, False, "zb1p", True, None)
    assert t.layout(4).dp == 2 and t.to_dict()["parallel"]["ep"] == 2
    with pytest.raises(ValueError, match="unknown key 'parallel.lr'"):
        build_configs("debug", ["parallel.lr=1"])


@pytest.mark.parametrize(
    "pairs, match",
    [
        (["pp=2", "fp8=true"], "fp8"),
        (["pp=2", "compile=true"], "compile"),
        (["pp=2", "ep=2"], "ep = 1"),
        (["pp=2", "micro_batch_size=1"], "micro_batch_size"),
    ],
)
def test_unsupported_combinations_fail_at_validate(pairs, match):
    with pytest.raises(ValueError, match=match):
        build_configs("debug", pairs)
