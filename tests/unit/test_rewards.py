"""GRPO reward specs and reward-function calls: task verifiers, user functions with dataset columns,
weights, None (does not apply) and the errors for a wrong length or a non-number; the engine's per-token
log-probs (SamplingParams.logprobs)."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.inference import LLM, SamplingParams
from dsv3.model import Transformer
from dsv3.rl import compute_rewards, parse_reward, parse_rewards
from dsv3.tasks import get_task


@pytest.fixture
def user_module():
    """A user's reward module, importable as `myrewards`."""
    mod = types.ModuleType("myrewards")

    def exact(prompts, completions, completion_ids, answer, **kw):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    def brevity(prompts, completions, completion_ids, **kw):
        return [None if len(ids) == 0 else -len(ids) / 10 for ids in completion_ids]

    def short(prompts, completions, completion_ids, **kw):
        return [1.0]

    def text(prompts, completions, completion_ids, **kw):
        return ["1"] * len(completions)

    def nan(prompts, completions, completion_ids, **kw):
        return [float("nan")] * len(completions)

    def never(prompts, completions, completion_ids, **kw):
        return [None] * len(completions)

    for f in (exact, brevity, short, text, nan, never):
        setattr(mod, f.__name__, f)
    sys.modules["myrewards"] = mod
    yield mod
    del sys.modules["myrewards"]


def _batch():
    prompts = ["What is 1+2?", "What is 3+4?", "What is 3+4?"]
    completions = ["3", "8", "<think>\nhm</think>7"]
    ids = [[5], [6, 7], []]
    return prompts, completions, ids, {"answer": ["3", "7", "7"], "a": [1, 3, 3], "b": [2, 4, 4]}


def test_user_function_gets_columns_and_weights_combine(user_module):
    rewards = parse_rewards(["myrewards:exact", "myrewards:brevity@0.5"])
    assert [r.weight for r in rewards] == [1.0, 0.5]
    per, total = compute_rewards(rewards, *_batch())
    assert per[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert per[0, 1] == pytest.approx(-0.1) and math.isnan(per[2, 1])  # None: does not apply
    assert total.tolist() == pytest.approx([1.0 - 0.05, -0.1, 0.0])  # nansum over functions


def test_task_verifier_on_prompt_file_columns():
    reward = parse_reward("add:digits=1")
    per, total = compute_rewards([reward], *_batch())
    assert per[:, 0].tolist() == [1.0, 0.1, 1.0]  # correct, well formed but wrong, correct after think
    assert parse_reward("task:add@2").weight == 2.0


def test_task_reward_default_and_problem_column():
    task = get_task("add:digits=1")
    (reward,) = parse_rewards([], task)
    p = task.split("train", 1)[0]
    per, _ = compute_rewards([reward], [p.prompt], [p.answer], [[1]], {"problem": [p]})
    assert per.item() == 1.0
    with pytest.raises(ValueError, match="--reward"):
        parse_rewards([], None)


def test_all_none_row_is_nan(user_module):
    per, total = compute_rewards(parse_rewards(["myrewards:never"]), *_batch())
    assert torch.isnan(total).all()


@pytest.mark.parametrize(
    "fn, message",
    [
        ("short", "returned 1 rewards for 3 completions"),
        ("text", "not a number or None"),
        ("nan", "not finite"),
    ],
)
def test_bad_reward_values_are_clear_errors(user_module, fn, message):
    with pytest.raises(ValueError, match=message) as e:
        compute_rewards(parse_rewards([f"myrewards:{fn}"]), *_batch())
    assert f"myrewards:{fn}" in str(e.value)


def test_bad_specs():
    with pytest.raises(ValueError, match="weight"):
        parse_reward("add@heavy")
    with pytest.raises(ValueError, match="cannot import"):
        parse_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="twice"):
        parse_rewards(["add", "add"])
    with pytest.raises(ValueError, match="--task"):
        parse_reward("task")


def test_reward_model_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="needs the reward model's run directory"):
        parse_reward("rm:")
    with pytest.raises(ValueError, match="not a reward model run directory"):
        parse_reward(f"rm:{tmp_path}")
    with pytest.raises(ValueError, match="weight"):
        parse_reward(f"rm:{tmp_path}@x")


def test_engine_logprobs_match_the_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("debug")).eval()
    llm = LLM(model, max_batch_size=2, max_seq_len=32)
    prompt = [1, 5, 9, 3]
    params = SamplingParams(
        max_new_tokens=5, temperature=0.8, seed=3, ignore_eos=True, logprobs=0, logprobs_mode="processed"
    )
    (out,) = llm.generate([prompt], params)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 5
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits / 0.8, -1)[len(prompt) - 1 : -1].gather(
        -1, torch.tensor(out.token_ids)[:, None]
    )
    assert torch.allclose(torch.tensor(out.logprobs), ref[:, 0], atol=1e-4)
    (plain,) = llm.generate(
        [prompt], SamplingParams(max_new_tokens=5, temperature=0.8, seed=3, ignore_eos=True)
    )
    assert plain.logprobs is None and plain.token_ids == out.token_ids  # recording changes no draw
