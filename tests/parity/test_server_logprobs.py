"""Prompt scoring parity: the server's `echo` + `max_tokens=0` prompt log-probabilities equal transformers'
log_softmax on the same weights (dsv3.save_pretrained -> DeepseekV3ForCausalLM, fp32), per token."""

from __future__ import annotations

import openai
import pytest
import torch

from dsv3 import ModelConfig, Transformer, save_pretrained
from dsv3.inference import LLM
from dsv3.serving import load_state

transformers = pytest.importorskip("transformers")

PROMPTS = [
    [5, 6, 7, 8, 9],
    [3, 4],
    [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [200, 2, 2, 9, 40, 1, 77, 3],
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve_in_thread):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug").replace(max_position_embeddings=128)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.05)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "m"
    save_pretrained(model, path, dtype=torch.float32)
    transformers.logging.set_verbosity_error()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="fp32", max_batch_size=4, max_seq_len=64)
    state = load_state(llm, model_name="m", max_queue=8)
    with serve_in_thread(state) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0), hf


def test_echo_prompt_logprobs_equal_transformers(served):
    client, hf = served
    r = client.completions.create(model="m", prompt=PROMPTS, max_tokens=0, echo=True, logprobs=1)
    assert len(r.choices) == len(PROMPTS)
    for c, p in zip(r.choices, PROMPTS):
        lp = c.logprobs.token_logprobs
        assert len(lp) == len(p) and lp[0] is None
        with torch.no_grad():
            logits = hf(torch.tensor([p])).logits[0].float()
        want = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(p[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp[1:]), want, atol=1e-4, rtol=0), (lp[1:], want)
        for i, top in enumerate(c.logprobs.top_logprobs[1:]):
            assert max(top.values()) == pytest.approx(float(torch.log_softmax(logits[i], -1).max()), abs=1e-4)
