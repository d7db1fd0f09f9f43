"""HF checkpoints: exact round trips (main model and MTP), dtypes, sharding, FP8 blocks, the published
layout, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import from_pretrained, save_pretrained
from dsv3.checkpoint.names import FP8_WEIGHT, dsv3_to_hf, hf_to_dsv3, mtp_copy_names
from dsv3.checkpoint.safetensors_io import parse_size
from dsv3.fp8 import dequantize_blocks, quantize_blocks


def _model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("debug").replace(**kw))
    with torch.no_grad():
        for moe in model.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


def _logits(model: Transformer, vocab: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids)
    return out.logits, out.mtp_logits


def _dtypes(path: Path) -> dict[str, str]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_slice(k).get_dtype() for k in h.keys()})  # noqa: SIM118
    return out


def _rewrite(path: Path, edit) -> None:
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))


# ------------------------------------------------------------------------------------------------ round trips
def test_round_trip_exact_fp32_with_mtp(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m", dtype=torch.float32)
    loaded = dsv3.from_pretrained(tmp_path / "m")
    a, a_mtp = _logits(model, 320)
    b, b_mtp = _logits(loaded, 320)
    assert torch.equal(a, b) and len(b_mtp) == 1 and torch.equal(a_mtp[0], b_mtp[0])
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not loaded.training
    names = _dtypes(tmp_path / "m")
    # DeepSeek's layout: per-expert tensors, MTP at layer num_hidden_layers with copies of embedding and head
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert {"model.layers.2.embed_tokens.weight", "model.layers.2.shared_head.head.weight"} <= set(names)
    assert "model.layers.2.shared_head.norm.weight" in names and "model.layers.2.eh_proj.weight" in names


def test_bf16_save_and_load(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m")  # default bf16
    dtypes = _dtypes(tmp_path / "m")
    assert dtypes.pop("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"
    assert dtypes.pop("model.layers.2.mlp.gate.e_score_correction_bias") == "F32"
    assert set(dtypes.values()) == {"BF16"}
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert loaded.layers[1].ffn.gate.e_score_correction_bias.dtype == torch.float32
    assert loaded.inv_freq.dtype == torch.float32
    torch.testing.assert_close(loaded.inv_freq, model.inv_freq)
    torch.testing.assert_close(
        loaded.layers[1].ffn.experts.w2.float(), model.layers[1].ffn.experts.w2.bfloat16().float()
    )


def test_sharded_save(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m", dtype=torch.float32, max_shard_size="200KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "m" / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for f in files for t in load_file(str(tmp_path / "m" / f)).values()
    )
    assert torch.equal(_logits(from_pretrained(tmp_path / "m"), 320)[0], _logits(model, 320)[0])


def test_tied_embeddings_round_trip(tmp_path):
    model = _model(tie_word_embeddings=True)
    assert model.head.weight is model.embed.weight
    save_pretrained(model, tmp_path / "m", dtype=torch.float32)
    assert "lm_head.weight" not in _dtypes(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.head.weight is loaded.embed.weight
    assert torch.equal(_logits(loaded, 320)[0], _logits(model, 320)[0])


def test_v2_half_rope_is_saved_interleaved(tmp_path):
    v2 = dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None)
    model = _model(rope_interleave=False, **v2)
    save_pretrained(model, tmp_path / "m", dtype=torch.float32)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["rope_interleave"] is True
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.config.rope_interleave and not torch.equal(
        loaded.layers[0].attn.wq.weight, model.layers[0].attn.wq.weight
    )
    torch.testing.assert_close(_logits(loaded, 320)[0], _logits(model, 320)[0], atol=1e-5, rtol=1e-5)


def test_names_round_trip():
    for kw in ({}, {"q_lora_rank": None}, {"num_nextn_predict_layers": 2, "first_k_dense_replace": 0}):
        cfg = ModelConfig.from_preset("debug").replace(**kw)
        with torch.device("meta"):
            model = Transformer(cfg)
        seen = set()
        for name in model.state_dict():
            for hf, e in dsv3_to_hf(name, cfg.num_hidden_layers, cfg.n_routed_experts):
                target = hf_to_dsv3(hf, cfg.num_hidden_layers)
                assert (target.name, target.expert, target.copy) == (name, e, False), hf
                assert hf not in seen
                seen.add(hf)
    assert hf_to_dsv3("model.layers.0.self_attn.rotary_emb.inv_freq", 2) is None


def test_published_v3_layout_element_count():
    """The 671B model in DeepSeek's layout (MTP with embed/head copies, FP8 scale_inv per 128x128 block,
    balance biases) holds exactly the 684,531,386,000 elements of the published checkpoint."""
    cfg = ModelConfig.from_preset("deepseek-v3-671b")
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = model.state_dict()
    total = sum(sd[ds].numel() for ds in mtp_copy_names(cfg.num_hidden_layers, 0).values())
    for name, t in sd.items():
        for hf, e in dsv3_to_hf(name, cfg.num_hidden_layers, cfg.n_routed_experts):
            shape = t.shape if e is None else t.shape[1:]
            total += shape.numel()
            if FP8_WEIGHT.fullmatch(hf):
                total += -(-shape[0] // 128) * -(-shape[1] // 128)
    assert total == 684_531_386_000


# ------------------------------------------------------------------------------------------------ FP8
def _fp8_model() -> Transformer:
    # dims that are not multiples of 128: full and partial 128x128 blocks
    dims = dict(
        hidden_size=192, intermediate_size=320, moe_intermediate_size=136, q_lora_rank=144, kv_lora_rank=136
    )
    return _model(num_attention_heads=2, qk_nope_head_dim=64, v_head_dim=64, vocab_size=64, **dims)


def test_fp8_round_trip_within_e4m3_rounding(tmp_path):
    model = _fp8_model()
    save_pretrained(model, tmp_path / "m", fp8=True)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    dtypes = _dtypes(tmp_path / "m")
    fp8 = [n for n, d in dtypes.items() if d == "F8_E4M3"]
    assert (
        "model.layers.0.self_attn.kv_b_proj.weight" in fp8
        and "model.layers.1.mlp.experts.3.up_proj.weight" in fp8
    )
    for n in fp8:
        assert dtypes[n + "_scale_inv"] == "F32"
    high = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.mlp.gate.weight",
        "model.norm.weight",
    ]
    high += ["model.layers.2.eh_proj.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"]
    assert all(dtypes[n] == "BF16" for n in high)
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert list(f.get_slice("model.layers.0.mlp.down_proj.weight_scale_inv").get_shape()) == [
            2,
            3,
        ]  # 192x320

    loaded = from_pretrained(tmp_path / "m")
    checked = 0
    for name, w in model.state_dict().items():
        got = loaded.state_dict()[name]
        hf = dsv3_to_hf(name, 2, 8)[0][0]
        if not FP8_WEIGHT.fullmatch(hf):
            continue
        for w2, g2 in zip(w.reshape(-1, *w.shape[-2:]), got.reshape(-1, *w.shape[-2:])):  # experts row by row
            q, s = quantize_blocks(w2)
            assert torch.equal(g2, dequantize_blocks(q, s))
            err = (g2 - w2).abs()
            # E4M3 keeps 3 mantissa bits: error <= 2^-4 relative, <= 2^-4 of the block's amax
            for bo in range(0, w2.shape[0], 128):
                for bi in range(0, w2.shape[1], 128):
                    blk = (slice(bo, bo + 128), slice(bi, bi + 128))
                    assert err[blk].max() <= 2**-4 * w2[blk].abs().max() + 1e-12
            assert torch.all(err <= 2**-4 * w2.abs() + w2.abs().max() / 448 * 2**-9)
            checked += 1
    assert checked >= 20
    ref, _ = _logits(model, 64)
    got, _ = _logits(loaded, 64)
    assert (ref - got).abs().max() < 0.05 * ref.abs().max()


# ------------------------------------------------------------------------------------------------ MTP
def test_checkpoint_without_mtp_warns_and_initialises(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m", dtype=torch.float32)
    _rewrite(tmp_path / "m", lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.2.")])
    with pytest.warns(UserWarning, match="no MTP tensors.*freshly initialised"):
        loaded = from_pretrained(tmp_path / "m")
    assert torch.equal(_logits(loaded, 320)[0], _logits(model, 320)[0])
    assert torch.all(loaded.mtp[0].enorm.weight == 1)
    assert torch.all(loaded.mtp[0].block.ffn.gate.e_score_correction_bias == 0)
    assert abs(loaded.mtp[0].eh_proj.weight.std().item() - 0.02) < 0.005


def test_partial_mtp_is_an_error(tmp_path):
    save_pretrained(_model(), tmp_path / "m", dtype=torch.float32)
    _rewrite(tmp_path / "m", lambda t: t.pop("model.layers.2.hnorm.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.2\.hnorm\.weight'"):
        from_pretrained(tmp_path / "m")


def test_mtp_copy_that_differs_warns(tmp_path):
    save_pretrained(_model(), tmp_path / "m", dtype=torch.float32)
    _rewrite(tmp_path / "m", lambda t: t["model.layers.2.shared_head.head.weight"].mul_(2))
    with pytest.warns(UserWarning, match="shared_head.head.weight.*differs"):
        from_pretrained(tmp_path / "m")
    save_pretrained(_model(), tmp_path / "ok", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_pretrained(tmp_path / "ok")  # identical copies: silent


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture
def saved(tmp_path) -> Path:
    save_pretrained(_model(), tmp_path / "m", dtype=torch.float32)
    return tmp_path / "m"


def test_missing_tensor(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(
        ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight'"
    ):
        from_pretrained(saved)


def test_unexpected_tensor(saved):
    _rewrite(
        saved, lambda t: t.__setitem__("model.layers.0.mlp.experts.0.up_proj.weight", torch.zeros(32, 64))
    )
    with pytest.raises(
        ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.experts\.0\.up_proj\.weight'"
    ):
        from_pretrained(saved)
    _rewrite(saved, lambda t: [t.pop("model.layers.0.mlp.experts.0.up_proj.weight"),
                               t.__setitem__("model.layers.3.enorm.weight", torch.ones(64))])  # fmt: skip
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.3\.enorm\.weight'"):
        from_pretrained(saved)


def test_wrong_shape(saved):
    _rewrite(
        saved, lambda t: t.__setitem__("model.layers.0.self_attn.kv_b_proj.weight", torch.zeros(128, 31))
    )
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.self_attn\.kv_b_proj\.weight' has shape \[128, 31\]"
    ):
        from_pretrained(saved)


def test_truncated_and_corrupt_files(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated.*model.safetensors"):
        from_pretrained(saved)
    f.write_bytes(data[:4])
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(saved)
    f.write_bytes((100).to_bytes(8, "little") + b"{not json" + b" " * 200)
    with pytest.raises(ValueError, match="corrupt.*model.safetensors"):
        from_pretrained(saved)


def test_bad_directories(tmp_path, saved):
    with pytest.raises(ValueError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an HF model directory"):
        from_pretrained(tmp_path / "empty")
    (saved / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        from_pretrained(saved)


def test_bad_shard_index(tmp_path):
    save_pretrained(_model(), tmp_path / "m", max_shard_size="200KB")
    index = tmp_path / "m" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="model-00099-of-00099.safetensors"):
        from_pretrained(tmp_path / "m")


def test_fp8_weight_without_scale(tmp_path):
    save_pretrained(_model(), tmp_path / "m", fp8=True)
    _rewrite(tmp_path / "m", lambda t: t.pop("model.layers.0.self_attn.o_proj.weight_scale_inv"))
    with pytest.raises(ValueError, match=r"FP8 tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' has no"):
        from_pretrained(tmp_path / "m")


def test_bad_save_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        save_pretrained(_model(), tmp_path / "m", dtype=torch.int8)
    with pytest.raises(ValueError, match="max_shard_size"):
        save_pretrained(_model(), tmp_path / "m", max_shard_size="lots")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size(10) == 10


# ------------------------------------------------------------------------------------------------ directories
class _Tok:
    def save(self, path):
        (Path(path) / "tokenizer.json").write_text("{}")


def test_run_dir_tokenizer_and_atomic_replace(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    model = _model()
    save_pretrained(model, run / "model", dtype=torch.float32, tokenizer=_Tok())
    assert (run / "model" / "tokenizer.json").is_file()
    assert torch.equal(_logits(from_pretrained(run), 320)[0], _logits(model, 320)[0])  # a run directory works
    with pytest.raises(ValueError, match="refusing to replace"):
        save_pretrained(model, run)  # never replaces a run directory
    # replacing a model directory keeps its tokenizer; a failed save leaves the old one intact
    model2 = _model(seed=1)
    save_pretrained(model2, run / "model", dtype=torch.float32)
    assert (run / "model" / "tokenizer.json").is_file()

    class Broken:
        def save(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_pretrained(model, run / "model", tokenizer=Broken())
    assert torch.equal(_logits(from_pretrained(run / "model"), 320)[0], _logits(model2, 320)[0])
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "model",
        "train_config.json",
    ]  # no temp dirs left


def test_convert_cli(tmp_path, capsys):
    from dsv3.cli import main

    model = _fp8_model()
    save_pretrained(model, tmp_path / "bf16", tokenizer=_Tok())
    assert (
        main(["convert", "--input", str(tmp_path / "bf16"), "--output", str(tmp_path / "fp8"), "--fp8"]) == 0
    )
    assert "F8_E4M3" in _dtypes(tmp_path / "fp8").values()
    assert (tmp_path / "fp8" / "tokenizer.json").is_file()
    assert (
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "fp8"),
                "--output",
                str(tmp_path / "fp32"),
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    dtypes = _dtypes(tmp_path / "fp32")
    assert set(dtypes.values()) == {"F32"} and not any(n.endswith("_scale_inv") for n in dtypes)
    assert "quantization_config" not in json.loads((tmp_path / "fp32" / "config.json").read_text())
    a = from_pretrained(tmp_path / "fp8").state_dict()
    b = from_pretrained(tmp_path / "fp32").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # dequantised exactly, nothing else changed
    assert main(["convert", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.gpu
def test_load_to_cuda_in_bf16(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m", fp8=True)
    gpu = from_pretrained(tmp_path / "m", dtype=torch.bfloat16, device="cuda")
    cpu = from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert gpu.embed.weight.device.type == "cuda" and gpu.inv_freq.device.type == "cuda"
    assert gpu.layers[1].ffn.gate.e_score_correction_bias.dtype == torch.float32
    for k, v in cpu.state_dict().items():
        assert torch.equal(gpu.state_dict()[k].cpu(), v), k
