"""`dsv3 sft` end to end on a tiny model: it learns a verifiable task (held-out accuracy rises), resumes
bit for bit, and rejects bad data with the file, line and field before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dsv3.cli import main
from dsv3.tasks import get_task, write_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A debug-preset run (3 steps of pre-training): the model SFT starts from."""
    out = tmp_path_factory.mktemp("sft") / "base"
    assert (
        main(
            ["train", "--preset", "debug", "--steps", "3", "--out", str(out), "--no-progress", "--no-sample"]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def add_data(tmp_path_factory) -> Path:
    task = get_task("add:digits=1")
    path = tmp_path_factory.mktemp("data") / "add1.jsonl"
    write_jsonl(path, task.sft_records(49, reasoning=False) * 20)  # every train problem, 20 times
    return path


def _eval(run: Path, capsys) -> dict:
    capsys.readouterr()
    assert (
        main(["eval", "--checkpoint", str(run), "--task", "add:digits=1", "--no-think", "--limit", "6"]) == 0
    )
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sft_learns_held_out_addition(base, add_data, tmp_path, capsys):
    before = _eval(base, capsys)
    run = tmp_path / "sft"
    args = ["sft", "--from", str(base), "--data", str(add_data), "--out", str(run), "--steps", "200"]
    assert main([*args, "--no-progress", "seq_len=64", "lr=3e-3"]) == 0
    after = _eval(run, capsys)
    assert before["greedy_pass@1"] == 0.0 and before["well_formed"] < 0.5
    assert after["well_formed"] >= 0.8  # answers in the trained format
    assert after["greedy_pass@1"] > before["greedy_pass@1"]  # held-out problems, never trained on
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["train"]["init_from"] and cfg["train"]["mtp_weight"] == 0.0


def test_sft_resume_is_bit_exact(base, add_data, tmp_path):
    common = [
        "sft",
        "--from",
        str(base),
        "--data",
        str(add_data),
        "--steps",
        "6",
        "--no-progress",
        "seq_len=64",
    ]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--stop-at", "3"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--resume"]) == 0

    def losses(run: Path) -> list[float]:
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r.get("type") == "train"]

    assert losses(tmp_path / "a")[-3:] == losses(tmp_path / "b")[-3:]
    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_sft_rejects_bad_records_before_training(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"messages": [{"role": "user", "content": 3}]}\n')
    assert main(["sft", "--from", str(base), "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "content" in err
    assert not (tmp_path / "r" / "checkpoints").exists()
