"""`dsv3 train --nproc N` (expert x data parallel) logs the losses of the single-process run; resume works."""

from __future__ import annotations

import json
import math

from dsv3.cli import main
from dsv3.train.checkpoint import state_file

COMMON = ["--preset", "debug", "--steps", "3", "--no-progress", "--no-sample"]
SETTINGS = ["dtype=float32", "eval_every=0", "fim_rate=0", "ckpt_every=0", "batch_size=4"]


def _train_records(run_dir) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if r.get("type") == "train"]


def _small_corpus(tmp_path):
    """40 KB of the bundled text: a quick tokenizer and a short final evaluation."""
    from importlib import resources

    text = (resources.files("dsv3") / "data" / "tinyshakespeare.txt").read_text()[:40_000]
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return ["--data", str(path)]


def test_nproc2_ep2_equals_single_process_and_resumes(tmp_path):
    single, dist = tmp_path / "single", tmp_path / "ep2"
    common = [*COMMON, *_small_corpus(tmp_path)]
    assert main(["train", *common, "--out", str(single), *SETTINGS]) == 0
    # two ranks, experts split over them (ep=2): stop after step 2 (a preemption), then resume
    assert (
        main(["train", *common, "--out", str(dist), "--stop-at", "2", "--nproc", "2", *SETTINGS, "ep=2"]) == 0
    )
    assert (dist / "checkpoints" / "step_00000002" / state_file(1)).is_file()
    assert main(["train", *common, "--out", str(dist), "--resume", "--nproc", "2", *SETTINGS, "ep=2"]) == 0
    a, b = _train_records(single), _train_records(dist)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-5), (ra["loss"], rb["loss"])
        assert math.isclose(ra["grad_norm"], rb["grad_norm"], rel_tol=1e-4)
        assert ra["expert_load"] == rb["expert_load"]  # loads all-reduced over the data-parallel ranks
    info = json.loads((dist / "train_config.json").read_text())
    cfg = info["train"]["parallel"]
    assert (cfg["ep"], cfg["nodes"], cfg["zero1"]) == (2, 1, True)
    assert info["expert_backend"] == ["padded"]  # the CPU training backend ("auto")
    # the HF export holds every expert, gathered from both ranks
    from dsv3.checkpoint import from_pretrained

    model = from_pretrained(dist)
    assert model.layers[1].ffn.experts.w1.shape[0] == model.config.n_routed_experts


def test_bad_layout_is_rejected_before_any_rank_starts(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["train", *COMMON, "--out", str(out), "--nproc", "2", "ep=3"]) == 2
    assert "ep=3" in capsys.readouterr().err
    assert main(["train", *COMMON, "--out", str(out), "ep=2"]) == 2  # ep=2 in one process
    assert "--nproc" in capsys.readouterr().err
    assert not out.exists()
