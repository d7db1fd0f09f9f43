"""`dsv3 plot` on a GRPO run: rewards.png from a short real run's metrics.jsonl (rewards per function,
held-out accuracy from `eval_every`, length, KL and clip fractions), and no loss.png."""

from __future__ import annotations

import pytest

from dsv3.cli import main
from dsv3.rl import GRPO, GRPOConfig, PromptSource, load_policy
from dsv3.rl.rewards import Reward, parse_rewards
from dsv3.tasks import get_task, write_jsonl
from dsv3.train.metrics import read_metrics
from dsv3.train.plot import grpo_curves, plot_run


def length_reward(prompts, completions, completion_ids, **kw):
    return [len(ids) / 8.0 for ids in completion_ids]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, eos_heavy_debug_model):
    """Two GRPO steps of a random debug model (EOS made likely: lengths vary) with held-out evaluation."""
    root = tmp_path_factory.mktemp("plot_grpo")
    policy, tok, _ = load_policy(eos_heavy_debug_model)
    task = get_task("add:digits=1")
    rewards = [Reward("length", length_reward), *parse_rewards(["task"], task)]
    gcfg = GRPOConfig(
        steps=2,
        prompts_per_step=2,
        num_generations=4,
        max_completion_length=8,
        lr=1e-3,
        beta=0.04,
        think=False,
        eval_every=1,
        eval_samples=4,
    )
    GRPO(
        policy, tok, PromptSource(tok, task=task, think=False), rewards, gcfg, root / "run", progress=False
    ).fit()
    return root / "run"


def test_grpo_run_logs_eval_accuracy(grpo_run):
    recs = read_metrics(grpo_run)
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 and r["eval_problems"] == 4 for r in evals)


def test_plot_grpo_run_writes_rewards_png(grpo_run, tmp_path):
    curves = grpo_curves(read_metrics(grpo_run))
    for key in ("rewards/length/mean", "rewards/task:add/mean", "reward", "kl", "clip_region"):
        assert curves[key][0] == [1, 2], key
    assert curves["eval_accuracy"][0] == [0, 1, 2]
    xs, ys = curves["rewards/length/mean"]
    assert all(0 < y <= 1 for y in ys)  # completion lengths 1..8, over 8
    written = plot_run(grpo_run, tmp_path / "plots")
    assert [p.name for p in written] == ["rewards.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written[0].stat().st_size > 10_000
    assert main(["plot", str(grpo_run)]) == 0
    assert (grpo_run / "plots" / "rewards.png").is_file() and not (grpo_run / "plots" / "loss.png").exists()


def test_grpo_curves_of_a_training_run_are_empty():
    assert grpo_curves([{"type": "train", "step": 1, "loss": 2.0}]) == {}


def test_eval_settings_are_checked(eos_heavy_debug_model, tmp_path):
    with pytest.raises(ValueError, match="eval_samples"):
        GRPOConfig(eval_samples=0).validate()
    with pytest.raises(ValueError, match="eval_every"):
        GRPOConfig(eval_every=-1).validate()
    policy, tok, _ = load_policy(eos_heavy_debug_model)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2=", "answer": "3"}])
    prompts = PromptSource(tok, path=tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match="eval_every needs a task"):
        GRPO(
            policy, tok, prompts, [Reward("length", length_reward)], GRPOConfig(eval_every=1), tmp_path / "r"
        )
