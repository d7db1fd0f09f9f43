"""ModelConfig: presets, HF config.json in/out (published and transformers-5 styles), validation errors."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.config import load_preset, preset_names

# The published DeepSeek-V3 config.json (the fields dsv3 reads; the file also has auto_map and more)
PUBLISHED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rms_norm_eps": 1e-06,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


def test_presets_load_and_validate():
    names = preset_names()
    for required in ("debug", "tiny", "small", "deepseek-v2-lite-16b", "deepseek-v3-671b"):
        assert required in names
    for name in names:
        cfg = ModelConfig.from_preset(name)
        assert cfg.validate() is cfg
        assert "model" in load_preset(name)


@pytest.mark.parametrize(("name", "low", "high"), [("tiny", 5e6, 15e6), ("small", 60e6, 200e6)])
def test_preset_sizes(name, low, high):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(name))
    assert low <= model.num_params(exclude_mtp=False) <= high


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("nope")


@pytest.mark.parametrize("name", ["debug", "tiny", "deepseek-v2-lite-16b", "deepseek-v3-671b"])
def test_hf_round_trip(name):
    cfg = ModelConfig.from_preset(name)
    d = json.loads(json.dumps(cfg.to_hf()))  # as written to config.json
    assert ModelConfig.from_hf(d) == cfg


def test_published_v3_config():
    cfg = ModelConfig.from_hf(PUBLISHED_V3)
    assert cfg.replace(aux_loss_alpha=0.0001, initializer_range=0.006) == ModelConfig.from_preset(
        "deepseek-v3-671b"
    )
    assert cfg.rope_type == "yarn" and cfg.rope_scaling["factor"] == 40
    assert cfg.kv_cache_values_per_token == 576


def test_transformers5_rope_parameters():
    d = dict(PUBLISHED_V3)
    del d["rope_scaling"], d["rope_theta"]
    rp = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 40, "beta_fast": 32, "beta_slow": 1}
    d["rope_parameters"] = {
        **rp,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
    }
    d["num_mtp_layers"] = d.pop("num_nextn_predict_layers")
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 50000.0 and cfg.rope_type == "yarn" and cfg.rope_scaling["factor"] == 40
    assert cfg.num_nextn_predict_layers == 1
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert ModelConfig.from_hf(d).rope_scaling is None


def test_transformers_config_objects_read_ours():
    transformers = pytest.importorskip("transformers")
    for name in ("debug", "deepseek-v2-lite-16b"):
        d = ModelConfig.from_preset(name).to_hf()
        hc = transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if k != "architectures"})
        assert hc.model_type == d["model_type"]
        assert hc.num_key_value_heads == d["num_attention_heads"]
        assert ModelConfig.from_hf(hc.to_dict()) == ModelConfig.from_preset(name).replace(
            initializer_range=0.02
        )


def test_v2_defaults():
    d = ModelConfig.from_preset("deepseek-v2-lite-16b").to_hf()
    assert d["model_type"] == "deepseek_v2"
    for k in ("topk_method", "scoring_func", "rope_interleave"):
        d.pop(k)
    d.pop("num_nextn_predict_layers")
    cfg = ModelConfig.from_hf(d)
    assert (cfg.topk_method, cfg.scoring_func, cfg.rope_interleave) == ("greedy", "softmax", True)
    assert cfg.num_nextn_predict_layers == 0  # V2 checkpoints have no MTP layer


BAD = [
    ("n_group", {"n_group": 3}),  # 8 experts not divisible by 3
    ("topk_group", {"topk_group": 5}),
    ("num_experts_per_tok", {"num_experts_per_tok": 5, "topk_group": 2}),  # 2 groups of 2 experts hold 4
    ("qk_rope_head_dim", {"qk_rope_head_dim": 7}),
    ("q_lora_rank", {"q_lora_rank": 0}),
    ("hidden_size", {"hidden_size": 0}),
    ("scoring_func", {"scoring_func": "relu"}),
    ("topk_method", {"topk_method": "best"}),
    ("rope_scaling", {"rope_scaling": {"type": "ntk"}}),
    (
        "rope_scaling.factor",
        {"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 8}},
    ),
    ("rope_scaling.original_max_position_embeddings", {"rope_scaling": {"type": "yarn", "factor": 4.0}}),
    (
        "rope_scaling.beta_fast",
        {
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 8,
                "beta_fast": 1,
                "beta_slow": 2,
            }
        },
    ),  # fmt: skip
    ("hidden_act", {"hidden_act": "gelu"}),
    ("routed_scaling_factor", {"routed_scaling_factor": 0.0}),
    ("num_nextn_predict_layers", {"num_nextn_predict_layers": -1}),
]


@pytest.mark.parametrize(("field", "kw"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_field(field, kw):
    with pytest.raises(ValueError, match=f"invalid config: {field.replace('.', '[.]')}:"):
        ModelConfig.from_preset("debug").replace(**kw)


def test_bad_config_from_hf_and_dict():
    with pytest.raises(ValueError, match="n_group"):
        ModelConfig.from_hf({**PUBLISHED_V3, "n_group": 7})
    with pytest.raises(ValueError, match="unknown model field"):
        ModelConfig.from_dict({"hidden_sise": 3})
