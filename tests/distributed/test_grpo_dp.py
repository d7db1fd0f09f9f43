"""GRPO under data parallelism (gloo, 2 ranks) takes the single-process steps: the same rewards, the
advantages of whole groups (a group straddles the two ranks), dapo's token normalisation over all ranks'
tokens, the same parameters after 2 steps; `dsv3 grpo --nproc 2` writes one metrics log and a checkpoint
that resumes (here in one process) onto the single-process run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dsv3.cli import main
from dsv3.parallel import run_local
from dsv3.rl import GRPO, GRPOConfig, PromptSource, Rollout, load_policy
from dsv3.rl.loss import group_advantages
from dsv3.rl.ranks import Ranks
from dsv3.rl.rewards import Reward, parse_rewards
from dsv3.tasks import get_task

# 3 prompts x 4 completions = 12 rows, 6 per rank: the second group has 2 rows on each rank.
# micro_batch=6: the single process accumulates the same two halves the two ranks compute, so the summed
# gradient is the same to the last bit (with another split AdamW's normalisation of near-zero gradients
# turns rounding differences into ~1e-4 parameter differences, which says nothing about the algorithm).
SETTINGS = dict(
    prompts_per_step=3,
    num_generations=4,
    max_completion_length=8,
    lr=1e-3,
    beta=0.04,
    loss_type="dapo",
    micro_batch=6,
    think=False,
    sample_every=0,
)
REWARD_SRC = """
def score(prompts, completions, completion_ids, **kw):
    return [sum(t % 5 for t in ids) / (4.0 * (1 + len(ids))) for ids in completion_ids]
"""


def score(prompts, completions, completion_ids, **kw):
    """A reward that varies within every group (the random model never solves the task)."""
    return [sum(t % 5 for t in ids) / (4.0 * (1 + len(ids))) for ids in completion_ids]


@pytest.fixture(scope="module")
def model_dir(eos_heavy_debug_model) -> Path:
    """Completions of 1 to 8 tokens, so the ranks' token counts differ and dapo's global normalisation
    matters."""
    return eos_heavy_debug_model


def _grpo(model_dir: Path, run_dir: Path, ranks: Ranks | None = None) -> GRPO:
    policy, tok, _ = load_policy(model_dir)
    task = get_task("add:digits=1")
    rewards = [Reward("dpreward:score", score), *parse_rewards(["task"], task)]
    cfg = GRPOConfig(steps=2, **SETTINGS, eval_every=1, eval_samples=4)
    prompts = PromptSource(tok, task=task, think=False)
    return GRPO(policy, tok, prompts, rewards, cfg, run_dir, progress=False, ranks=ranks)


def _fit(rl: GRPO) -> dict:
    """rl.fit() with each step's rollout kept: advantages and rewards [N], this rank's token count."""
    out: dict = {"advantages": [], "rewards": [], "tokens": []}
    rollout = rl.rollout

    def keep(step: int) -> Rollout:
        ro = rollout(step)
        out["advantages"].append(ro.advantages)
        out["rewards"].append(ro.rewards_per_func)
        out["tokens"].append(sum(len(c) for c in ro.completion_ids))
        return ro

    rl.rollout = keep  # type: ignore[method-assign]
    rl.fit()
    out["params"] = {k: v.detach().clone() for k, v in rl.policy.state_dict().items()}
    return out


def _dp_worker(rank: int, world: int, model_dir: str, run_dir: str) -> dict:
    return _fit(_grpo(Path(model_dir), Path(run_dir), Ranks(dist.group.WORLD)))


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory) -> dict:
    """The single-process run: its rollouts, final parameters and run directory."""
    run = tmp_path_factory.mktemp("single") / "run"
    return {**_fit(_grpo(model_dir, run)), "run": run}


def _gather_worker(rank: int, world: int) -> dict:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 2.0, 2.0, 2.0, float("nan")])
    ranks = Ranks(dist.group.WORLD)
    mine = ranks.rows(len(rewards))
    gathered = ranks.gather_rows(rewards[mine].clone())
    return {"gathered": gathered, "adv": group_advantages(gathered, 3)[0][mine], "rows": mine}


def test_advantages_of_gathered_shards(tmp_path):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 2.0, 2.0, 2.0, float("nan")])
    full = group_advantages(rewards, 3)[0]
    res = run_local(_gather_worker, 2, timeout_s=60)
    assert [r["rows"] for r in res] == [slice(0, 6), slice(6, 12)]
    for r in res:
        assert torch.equal(r["gathered"].nan_to_num(-1), rewards.nan_to_num(-1))
        assert torch.equal(r["adv"], full[r["rows"]])


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool(((a - b).abs() <= rel * b.abs().max().clamp(min=1e-12)).all())


def test_two_ranks_take_the_single_process_steps(model_dir, single, tmp_path):
    ranks = run_local(_dp_worker, 2, (str(model_dir), str(tmp_path / "dp")), timeout_s=120)
    assert ranks[0]["tokens"] != ranks[1]["tokens"]  # a local dapo normalisation would differ
    for r in ranks:
        for step in range(2):
            assert torch.equal(r["advantages"][step], single["advantages"][step])
            assert torch.equal(r["rewards"][step], single["rewards"][step])
        for k, v in single["params"].items():
            assert _close(r["params"][k], v), k
    start = load_policy(model_dir)[0].state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in single["params"].items())  # the steps moved it


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_nproc2_cli_writes_one_log_and_resumes_in_one_process(model_dir, single, tmp_path, monkeypatch):
    (tmp_path / "dpreward.py").write_text(REWARD_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the spawned ranks import the reward module too
    kv = [f"{k}={v}" for k, v in SETTINGS.items() if k != "think"] + ["eval_every=1", "eval_samples=4"]
    common = ["grpo", "--from", str(model_dir), "--task", "add:digits=1", "--reward", "dpreward:score"]
    common += ["--reward", "task", "--steps", "2", "--no-think", "--no-progress", *kv]
    dp = tmp_path / "dp"
    assert main([*common, "--out", str(dp), "--nproc", "2", "--stop-at", "1"]) == 0
    assert main([*common, "--out", str(dp), "--resume"]) == 0  # rank 0's checkpoint is a full replica
    a, b = _records(single["run"], "grpo"), _records(dp, "grpo")
    assert [r["step"] for r in b] == [1, 2]
    assert len(_records(dp, "run")) == 3  # start, resume, stop: rank 0 alone writes
    for ra, rb in zip(a, b):
        for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/dpreward:score/mean"):
            assert ra[key] == rb[key], key
        for key in ("loss", "kl", "grad_norm", "completion_length_mean", "clip_region", "entropy"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-7), (key, ra[key], rb[key])
    assert [r["step"] for r in _records(dp, "eval")] == [0, 1, 2]
    assert _records(dp, "eval") == _records(single["run"], "eval")
    wa = load_file(single["run"] / "model" / "model.safetensors")
    wb = load_file(dp / "model" / "model.safetensors")
    for k in wa:
        assert _close(wb[k], wa[k]), k


def test_nproc_must_split_the_step(model_dir, tmp_path, capsys):
    args = ["grpo", "--from", str(model_dir), "--task", "add:digits=1", "--out", str(tmp_path / "x")]
    assert main([*args, "--nproc", "2", "prompts_per_step=3", "num_generations=3"]) == 2
    assert "multiple of 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
