"""convert_to_fp8 on the dsv3 Transformer: what converts, what stays high precision, training still works."""

import copy

import pytest
import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.fp8 import FP8Config, FP8GroupedExperts, convert_to_fp8, fp8_module_names
from dsv3.fp8.quant import fake_quantize_blocks
from dsv3.model.transformer import Transformer, lm_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models are op-overhead bound: one thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def debug_pair():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    ref = Transformer(cfg)
    return cfg, ref, convert_to_fp8(copy.deepcopy(ref), FP8Config())


def test_converts_gemms_and_keeps_the_paper_high_precision_parts(debug_pair):
    cfg, ref, m = debug_pair
    names = set(fp8_module_names(m))
    for i in range(cfg.num_hidden_layers):
        for p in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo"):
            assert f"layers.{i}.attn.{p}" in names
    assert {"layers.0.ffn.w1", "layers.0.ffn.w2", "layers.0.ffn.w3"} <= names  # dense MLP
    assert {"layers.1.ffn.experts", "layers.1.ffn.shared_experts.w1", "mtp.0.eh_proj"} <= names
    assert isinstance(m.layers[1].ffn.experts, FP8GroupedExperts)
    # high precision: embedding, output head, MoE gate, norms; no Linear left except the head
    assert type(m.head) is nn.Linear and type(m.embed) is nn.Embedding
    assert not any(n.endswith(("gate", "norm", "head", "embed")) for n in names)
    leftovers = [n for n, mod in m.named_modules() if type(mod) is nn.Linear]
    assert leftovers == ["head"]
    assert m.state_dict().keys() == ref.state_dict().keys()
    assert all(p.dtype == torch.float32 for p in m.parameters())  # fp32 master weights


def test_parameters_are_shared_and_conversion_is_idempotent():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("debug"))
    before = {n: id(p) for n, p in m.named_parameters()}
    convert_to_fp8(m)
    assert {n: id(p) for n, p in m.named_parameters()} == before  # an optimizer built earlier keeps working
    names = fp8_module_names(m)
    convert_to_fp8(m)
    assert fp8_module_names(m) == names


def test_filter_and_config_forms():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    m = convert_to_fp8(
        Transformer(cfg), {"pow2_scales": True, "experts": False}, filter=lambda n, mod: "attn" in n
    )
    names = fp8_module_names(m)
    assert names and all(".attn." in n for n in names)
    assert all(m.get_submodule(n).fp8_config.pow2_scales for n in names)
    m2 = convert_to_fp8(Transformer(cfg), cfg)  # a model config gives the default recipe
    assert "layers.1.ffn.experts" in fp8_module_names(m2)
    with pytest.raises(ValueError, match="unknown field"):
        convert_to_fp8(Transformer(cfg), {"block": 64})
    with pytest.raises(ValueError, match="must be an FP8Config"):
        convert_to_fp8(Transformer(cfg), "fp8")


def test_forward_backward_close_to_fp32(debug_pair):
    cfg, ref, m = debug_pair
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (ref, m):
        model.zero_grad()
        out = lm_loss(model(ids), ids, mtp_weight=0.3, balance_alpha=1e-4)
        out.loss.backward()
        losses.append(out.loss.item())
    assert abs(losses[1] - losses[0]) / losses[0] < 0.01, losses
    for n, p in m.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), n
    g_ref = ref.layers[0].attn.wo.weight.grad
    g = m.layers[0].attn.wo.weight.grad
    assert ((g - g_ref).norm() / g_ref.norm()).item() < 0.25  # many chained FP8 GEMMs upstream


class _PrefillCache:
    """A one-shot cache: no history, just switches the attention path."""

    mask = None

    def __init__(self, absorb: bool):
        self.absorb = absorb

    def update(self, layer_id, c, pe):
        return c, pe


def test_absorbed_decode_reads_the_fp8_wkv_b(debug_pair):
    cfg, _, m = debug_pair
    wkv_b = m.layers[0].attn.wkv_b
    assert type(m.layers[0].attn).__name__ == "FP8MLA"
    assert torch.equal(wkv_b.dequantized_weight(), fake_quantize_blocks(wkv_b.weight.detach()))
    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        naive = m(ids, cache=_PrefillCache(absorb=False)).logits
        absorbed = m(ids, cache=_PrefillCache(absorb=True)).logits
    # both read the same E4M3 wkv_b; only the activations' quantisation in the naive GEMM differs
    assert ((absorbed - naive).norm() / naive.norm()).item() < 0.05


def test_short_fp8_training_run_tracks_fp32():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    ref = Transformer(cfg)
    m = convert_to_fp8(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 64, (4, 32), generator=g) for _ in range(2)]  # a small alphabet: learnable
    curves = []
    for model in (ref, m):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        curve = []
        for step in range(8):
            ids = batches[step % 2]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = lm_loss(model(ids), ids, mtp_weight=0.3, balance_alpha=1e-4)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(out.main_loss.item())
        curves.append(curve)
    assert curves[1][-1] < curves[1][0] - 0.5  # FP8 training learns
    assert abs(curves[1][-1] - curves[0][-1]) / curves[0][-1] < 0.03, curves
