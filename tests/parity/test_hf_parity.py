"""Logits parity with transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM, through checkpoint files.

Both directions on several tiny fp32 configs: dsv3 -> save_pretrained -> transformers from_pretrained, and
transformers save_pretrained -> dsv3 from_pretrained. Weights are random with norms away from 1 and
non-zero balance biases, so a swapped or mis-mapped tensor shows up in the logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import from_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

TOL = 1e-4
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,  # != mscale: cos/sin get an attention factor != 1
}
V2_YARN = {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}


def _base() -> ModelConfig:
    return ModelConfig.from_preset("debug").replace(max_position_embeddings=128)


CONFIGS = {
    # V3: sigmoid, noaux_tc groups, balance bias, q_lora, interleaved rope
    "v3": lambda: _base(),
    # V3 with YaRN, rotate_half rope layout and a plain wq (no q_lora)
    "v3_yarn_half_rope_no_qlora": lambda: _base().replace(
        rope_scaling=YARN, rope_interleave=False, q_lora_rank=None
    ),
    # top-1 routing: transformers (and DeepSeek's inference code) still normalise the sigmoid gate
    "v3_top1": lambda: _base().replace(num_experts_per_tok=1, topk_group=1, routed_scaling_factor=1.5),
    # V2-Lite: softmax, greedy, one group, no q_lora, no normalisation, 2 shared experts, YaRN, no MTP
    "v2_lite": lambda: _base().replace(
        scoring_func="softmax",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        q_lora_rank=None,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_shared_experts=2,
        rope_scaling=V2_YARN,
        num_nextn_predict_layers=0,
    ),  # fmt: skip
    # V2 (236B-style): group-limited greedy, a scaling factor; dsv3's rotate_half layout is permuted on save
    "v2_group_limited_half_rope": lambda: _base().replace(
        scoring_func="softmax",
        topk_method="group_limited_greedy",
        norm_topk_prob=False,
        routed_scaling_factor=16.0,
        rope_interleave=False,
        num_nextn_predict_layers=0,
    ),  # fmt: skip
}


@torch.no_grad()
def _randomize(named: list[tuple[str, torch.Tensor]]) -> None:
    """Matrices N(0, 0.08), norms 1 + N(0, 0.2), balance biases N(0, 0.05)."""
    for name, t in named:
        if "e_score_correction_bias" in name:
            t.normal_(0.0, 0.05)
        elif "norm" in name:
            t.normal_(1.0, 0.2)
        else:
            t.normal_(0.0, 0.08)


def _hf_config(cfg: ModelConfig):
    d = cfg.to_hf()
    d.pop("architectures")
    return transformers.AutoConfig.for_model(**d)


def _inputs(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dsv3_to_transformers(name, tmp_path):
    cfg = CONFIGS[name]()
    model = Transformer(cfg)
    _randomize(list(model.named_parameters()) + list(model.named_buffers()))
    model.inv_freq.copy_(Transformer(cfg).inv_freq)  # not a weight
    save_pretrained(model, tmp_path / "m", dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    expected_cls = "DeepseekV2ForCausalLM" if cfg.scoring_func == "softmax" else "DeepseekV3ForCausalLM"
    assert type(hf).__name__ == expected_cls
    ids = _inputs(cfg)
    with torch.no_grad():
        ours = model(ids).logits
    theirs = _hf_logits(hf, ids)
    assert ours.abs().max() > 0.5  # the comparison is not between near-zero logits
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_to_dsv3(name, tmp_path):
    cfg = CONFIGS[name]()
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(cfg), dtype=torch.float32)
    _randomize(
        [(n, p) for n, p in hf.named_parameters()] + [(n, b) for n, b in hf.named_buffers() if "bias" in n]
    )
    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = from_pretrained(tmp_path / "hf")
    if cfg.num_nextn_predict_layers:
        assert any("MTP" in str(w.message) for w in caught), "missing MTP layer must warn"
    ids = _inputs(cfg)
    with torch.no_grad():
        ours = model(ids).logits
    theirs = _hf_logits(hf.eval(), ids)
    assert ours.abs().max() > 0.5
    assert (ours - theirs).abs().max().item() <= TOL


def test_parity_configs_exercise_the_bias():
    """The parity configs exercise the bias: zeroing it changes the logits (so a dropped bias would show)."""
    cfg = CONFIGS["v3"]()
    model = Transformer(cfg)
    _randomize(list(model.named_parameters()) + list(model.named_buffers()))
    model.inv_freq.copy_(Transformer(cfg).inv_freq)
    ids = _inputs(cfg)
    with torch.no_grad():
        a = model(ids).logits
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.zero_()
        b = model(ids).logits
    assert (a - b).abs().max() > 10 * TOL
