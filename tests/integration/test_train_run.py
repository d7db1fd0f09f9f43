"""End-to-end training on the debug preset: the loss falls, `--stop-at` + `--resume` replays the same
losses bit for bit, a corrupted newest checkpoint is named and skipped, the NaN guard skips and stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv3.cli import main
from dsv3.train.checkpoint import MODEL_FILE, list_checkpoints
from dsv3.train.cli import build_configs
from dsv3.train.data import bundled_corpus_path
from dsv3.train.distributed import make_trainer
from dsv3.train.metrics import read_metrics
from dsv3.train.trainer import TrainingDiverged

FAST = ["seq_len=32", "batch_size=4", "eval_batches=1", "sample_tokens=8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    p.write_text(bundled_corpus_path().read_text()[:30_000])
    return p


def _train(corpus, out, *extra):
    argv = ["train", "--preset", "debug", "--data", str(corpus), "--out", str(out), "--no-progress", *extra]
    return main(argv)


def _losses(run_dir):
    return [
        (r["step"], r["loss"], r["mtp_loss"], r["grad_norm"])
        for r in read_metrics(run_dir)
        if r["type"] == "train"
    ]


def test_short_run_loss_falls_and_writes_everything(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(corpus, out, "--steps", "30", *FAST, "eval_every=15", "ckpt_every=15") == 0
    recs = read_metrics(out)
    train = [r for r in recs if r["type"] == "train"]
    assert len(train) == 30
    for key in (
        "loss",
        "mtp_loss",
        "balance_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "max_vio",
        "expert_load",
    ):
        assert key in train[0]
    assert sum(r["loss"] for r in train[-5:]) / 5 < train[0]["loss"] - 1.0
    evals = [r for r in recs if r["type"] == "eval"]
    assert [(e["step"], e["full"]) for e in evals] == [(15, False), (30, True)]  # the last covers all of val
    assert evals[-1]["val_loss"] < train[0]["loss"] - 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_bpb"] == evals[-1]["val_bpb"] and summary["bigram_bpb"] > 2
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000015", "step_00000030"]
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    stdout = capsys.readouterr().out
    assert "val_bpb" in stdout and "--- sample" in stdout
    from safetensors.torch import load_file

    from dsv3.checkpoint import from_pretrained

    model = from_pretrained(out)  # the exported HF directory holds the trained weights
    native = load_file(out / "checkpoints" / "step_00000030" / MODEL_FILE)
    for name in ("embed.weight", "layers.1.ffn.experts.w1", "layers.1.ffn.gate.e_score_correction_bias"):
        assert torch.equal(model.state_dict()[name], native[name]), name
    assert main(["plot", str(out)]) == 0
    assert (out / "plots" / "loss.png").stat().st_size > 0 and (out / "plots" / "expert_load.png").is_file()
    assert _train(corpus, out, "--steps", "30", *FAST) == 2  # an existing run needs --resume or --overwrite


def test_stop_and_resume_is_bit_exact(corpus, tmp_path):
    args = [
        "--steps",
        "12",
        *FAST,
        "eval_every=4",
        "ckpt_every=0",
        "dropout=0.1",
        "--no-sample",
    ]  # RNG in play
    assert _train(corpus, tmp_path / "a", *args) == 0
    assert _train(corpus, tmp_path / "b", *args, "--stop-at", "5") == 0
    assert len(_losses(tmp_path / "b")) == 5 and not (tmp_path / "b" / "summary.json").exists()
    assert _train(corpus, tmp_path / "b", *args, "--resume") == 0
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == 12 and a == b  # same floats, bit for bit


def test_corrupted_newest_checkpoint_is_named_and_skipped(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--steps", "8", *FAST, "eval_every=0", "ckpt_every=2", "--no-sample"]
    assert _train(corpus, out, *args, "--stop-at", "6") == 0
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == "step_00000006"
    f = newest / MODEL_FILE
    f.write_bytes(f.read_bytes()[:-7])  # truncated
    capsys.readouterr()
    assert _train(corpus, out, *args, "--resume") == 0
    text = capsys.readouterr().out
    assert "step_00000006" in text and "truncated" in text and "step_00000004 (step 4)" in text
    assert [r["step"] for r in read_metrics(out) if r["type"] == "train"] == list(range(1, 9))


def test_nan_guard_skips_then_stops(corpus, tmp_path):
    model_cfg, train_cfg = build_configs(
        "debug", [*FAST, "eval_every=0", "ckpt_every=2", "max_bad_steps=3"], 10
    )
    trainer = make_trainer(model_cfg, train_cfg, tmp_path / "run", data=corpus, progress=False)
    real = trainer.loss_step.fn
    poison = {3}  # steps (0-based) whose loss is NaN

    def loss_fn(x, y, w, packing=()):
        losses, counts = real(x, y, w, packing)
        if trainer.step in poison:
            losses.loss = losses.loss * float("nan")
        return losses, counts

    trainer.loss_step.fn = loss_fn
    trainer.fit(stop_at=6)
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs if r["type"] == "skip"] == [4]
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 2, 3, 5, 6]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    poison.update(range(6, 10))  # now every step is NaN: the run stops after 3 in a row
    before = (list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / MODEL_FILE).read_bytes()
    with pytest.raises(TrainingDiverged, match=r"3 non-finite steps in a row.*step_00000006\) is intact"):
        trainer.fit()
    assert (list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / MODEL_FILE).read_bytes() == before


def test_gradient_accumulation_matches_one_batch(corpus, tmp_path):
    """micro_batch_size splits a step's batch without changing the update (FP32, up to rounding)."""
    losses = []
    for micro in ("null", "2"):
        extra = [*FAST, "eval_every=0", "ckpt_every=0", "dtype=float32", f"micro_batch_size={micro}"]
        model_cfg, train_cfg = build_configs("debug", extra, 4)
        trainer = make_trainer(model_cfg, train_cfg, tmp_path / micro, data=corpus, progress=False)
        losses.append([trainer.train_step()["total_loss"] for _ in range(4)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_disk_full_while_checkpointing_is_one_error_line(corpus, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of a run: `dsv3 train` exits 2 with one line naming the checkpoint it could not
    write; the previous checkpoint is intact and resumable."""
    import errno

    from dsv3 import io as dio

    real = dio.write_synced

    def write(path, data):
        if "step_00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(dio, "write_synced", write)
    out = tmp_path / "run"
    args = ["--steps", "4", *FAST, "eval_every=0", "ckpt_every=2", "--no-sample"]
    capsys.readouterr()
    assert _train(corpus, out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert "step_00000004" in err and "intact (newest: step_00000002)" in err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002"]
    monkeypatch.undo()
    assert _train(corpus, out, *args, "--resume") == 0
