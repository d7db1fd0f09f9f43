"""Greedy generation parity: dsv3's engine (naive prefill, absorbed decode over the latent cache,
continuous batching) produces the token ids of transformers' DeepseekV3ForCausalLM.generate on the same
random weights, moved through an HF checkpoint directory (dsv3 save_pretrained -> transformers load)."""

from __future__ import annotations

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.inference import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

NEW = 16
PROMPTS = [
    [5, 6, 7, 8, 9],
    [3, 4],
    [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [200, 2, 2, 9, 40, 1, 77, 3],
]
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


@pytest.fixture(scope="module", params=["v3", "v3_yarn"])
def models(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug").replace(max_position_embeddings=128)
    if request.param == "v3_yarn":
        cfg = cfg.replace(rope_scaling=YARN)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.05)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / request.param
    save_pretrained(model, path, dtype=torch.float32)
    transformers.logging.set_verbosity_error()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, hf


def hf_greedy(hf, prompt):
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_ids_equal_transformers_batch_1(models):
    model, hf = models
    llm = LLM(model, max_batch_size=1, max_seq_len=64)
    for p in PROMPTS:
        (o,) = llm.generate([p], SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True))
        assert o.token_ids == hf_greedy(hf, p)


def test_greedy_ids_equal_transformers_batched_unequal_lengths(models):
    model, hf = models
    refs = [hf_greedy(hf, p) for p in PROMPTS]
    # batched with left padding on the transformers side as well
    P = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, P - len(p) :], mask[i, P - len(p) :] = torch.tensor(p), 1
    out = hf.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert out[:, P:].tolist() == refs
    for batch in (4, 3):  # all at once, and with a request joining when another leaves
        llm = LLM(model, max_batch_size=batch, max_seq_len=64)
        outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True))
        assert [o.token_ids for o in outs] == refs
