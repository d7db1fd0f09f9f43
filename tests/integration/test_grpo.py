"""`dsv3 grpo` end to end on tiny models: the reward rises on a task a warm-started model half-solves, the
rollout engine samples with the weights of the latest optimizer step (shared tensors, no reload), a run
resumes bit for bit, prompts files pass their columns to user reward functions, bad rewards fail early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv3.cli import main
from dsv3.inference import LLM, SamplingParams
from dsv3.model import Transformer
from dsv3.rl import GRPO, GRPOConfig, PromptSource, load_policy, parse_rewards
from dsv3.tasks import get_task, write_jsonl

FAST = ["--no-think", "--no-progress", "max_completion_length=8"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    """A debug model pre-trained 3 steps, then SFT on 1-digit addition for 100 steps: it answers in the
    format and gets about a third of the sampled answers right (a task it half-solves)."""
    root = tmp_path_factory.mktemp("grpo")
    base, data, run = root / "base", root / "add1.jsonl", root / "sft"
    args = ["train", "--preset", "debug", "--steps", "3", "--out", str(base), "--no-progress", "--no-sample"]
    assert main(args) == 0
    write_jsonl(data, get_task("add:digits=1").sft_records(49, reasoning=False) * 20)
    args = ["sft", "--from", str(base), "--data", str(data), "--out", str(run), "--steps", "100"]
    assert main([*args, "--no-progress", "seq_len=64", "lr=3e-3"]) == 0
    return run


def _records(run: Path, kind: str = "grpo") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_grpo_reward_rises(sft, tmp_path):
    run = tmp_path / "rl"
    args = ["grpo", "--from", str(sft), "--task", "add:digits=1", "--out", str(run), "--steps", "40"]
    assert main([*args, *FAST, "lr=3e-4", "sample_every=10"]) == 0
    recs = _records(run)
    assert len(recs) == 40
    first = sum(r["reward"] for r in recs[:10]) / 10
    last = sum(r["reward"] for r in recs[-10:]) / 10
    assert 0.15 < first < 0.6  # the warm start half-solves the task
    assert last > first + 0.04, (first, last)
    r = recs[-1]
    for key in (
        "rewards/task:add/mean",
        "rewards/task:add/std",
        "frac_reward_zero_std",
        "entropy",
        "completion_length_max",
        "clip_region",
        "rollout_tokens_per_s",
        "train_tokens_per_s",
    ):
        assert key in r
    assert r["logprob_gap_max"] < 1e-4  # engine and training forward agree on the sampled tokens
    assert len(_records(run, "sample")) == 8  # 2 samples every 10 steps
    assert (run / "model" / "config.json").is_file()
    before, after = (
        load_file(sft / "model" / "model.safetensors"),
        load_file(run / "model" / "model.safetensors"),
    )
    mtp = [
        k for k in before if k.startswith("model.layers.2.") and "embed" not in k and "shared_head" not in k
    ]
    assert mtp and all((before[k] == after[k]).all() for k in mtp)  # MTP is not trained by default
    assert not all((before[k] == after[k]).all() for k in before)


def test_engine_samples_with_the_updated_weights(sft, tmp_path):
    policy, tok, _ = load_policy(sft)
    task = get_task("add:digits=1")
    cfg = GRPOConfig(
        steps=1,
        prompts_per_step=2,
        num_generations=4,
        lr=3e-2,
        max_completion_length=6,
        think=False,
        sample_every=0,
    )
    rl = GRPO(
        policy,
        tok,
        PromptSource(tok, task=task, think=False),
        parse_rewards([], task),
        cfg,
        tmp_path / "r",
        progress=False,
    )
    shared = dict(rl.engine_model.named_parameters())
    assert all(p.data_ptr() == shared[n].data_ptr() for n, p in rl.policy.named_parameters())
    prompt = rl.prompts.batch(0, 1)[0].ids
    params = SamplingParams(
        max_new_tokens=6, temperature=1.0, seed=1, ignore_eos=True, logprobs=0, logprobs_mode="processed"
    )
    before = rl.llm.generate([prompt], params)[0]
    rl.train_on(rl.rollout(0))  # one optimizer step, in place
    after = rl.llm.generate([prompt], params)[0]
    fresh = Transformer(rl.policy.config)
    fresh.load_state_dict(rl.policy.state_dict())  # a copy of the updated weights, in a new engine
    ref = LLM(fresh, max_batch_size=1, max_seq_len=64).generate([prompt], params)[0]
    assert after.token_ids == ref.token_ids
    assert torch.allclose(torch.tensor(after.logprobs), torch.tensor(ref.logprobs), atol=1e-5)
    assert not torch.allclose(torch.tensor(after.logprobs), torch.tensor(before.logprobs), atol=1e-3)


def test_grpo_resume_is_bit_exact(sft, tmp_path):
    common = ["grpo", "--from", str(sft), "--task", "add:digits=1", "--steps", "4", *FAST]
    common += ["lr=1e-3", "beta=0.04", "num_iterations=2", "prompts_per_step=4", "num_generations=4"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--stop-at", "2"]) == 0
    assert not (tmp_path / "b" / "model").exists()
    assert main([*common, "--out", str(tmp_path / "b"), "--resume"]) == 0
    ra, rb = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for key in ("reward", "loss", "kl", "grad_norm"):
        assert [r[key] for r in ra] == [r[key] for r in rb]
    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert ra[-1]["kl"] > 0


def test_prompts_file_columns_reach_user_rewards(sft, tmp_path, monkeypatch, capsys):
    (tmp_path / "myreward.py").write_text(
        "def exact(prompts, completions, completion_ids, answer, a, **kw):\n"
        "    assert all(isinstance(p, list) for p in prompts)\n"
        "    return [1.0 if c.strip() == str(x) else 0.0 for c, x in zip(completions, answer)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recs = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b), "a": a, "b": b}
        for a, b in [(1, 2), (3, 4), (2, 2)]
    ]
    write_jsonl(tmp_path / "p.jsonl", recs)
    run = tmp_path / "rl"
    args = ["grpo", "--from", str(sft), "--prompts", str(tmp_path / "p.jsonl"), "--out", str(run)]
    args += ["--reward", "myreward:exact", "--reward", "add@0.5", "--steps", "2", *FAST, "prompts_per_step=2"]
    assert main([*args, "num_generations=3", "mtp_weight=0.1"]) == 0
    r = _records(run)[-1]
    assert "rewards/myreward:exact/mean" in r and "rewards/add/mean" in r
    assert r["mtp_loss"] > 0  # mtp_weight > 0 trains MTP on the rollouts
    capsys.readouterr()
    assert main(["grpo", "--resume", *args[1:], "num_generations=3", "mtp_weight=0.1", "loss_type=grpo"]) == 2
    assert "settings differ" in capsys.readouterr().err  # a resume keeps the run's settings


def test_bad_reward_fails_before_training(sft, tmp_path, capsys, monkeypatch):
    (tmp_path / "badreward.py").write_text(
        "def f(prompts, completions, completion_ids, **kw):\n    return [1.0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["grpo", "--from", str(sft), "--task", "add:digits=1", "--reward", "badreward:f"]
    assert main([*args, "--out", str(tmp_path / "r"), "--steps", "2", *FAST]) == 2
    err = capsys.readouterr().err
    assert "badreward:f" in err and "returned 1 rewards for 64 completions" in err
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert main(["grpo", "--from", str(sft), "--task", "add", "--out", str(tmp_path / "x"), "beta=-1"]) == 2
    assert "beta must be >= 0" in capsys.readouterr().err
