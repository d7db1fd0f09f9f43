"""`dsv3 train --nproc 2 pp=2` (pipeline parallel) logs the losses of the single-process run with the same
micro-batches, under 1F1B and DualPipeV; a stopped and resumed pipeline run continues exactly."""

from __future__ import annotations

import json
import math

import pytest

from dsv3.cli import main
from dsv3.train.checkpoint import model_file, state_file

COMMON = ["--preset", "debug", "--steps", "3", "--no-progress", "--no-sample"]
SETTINGS = ["dtype=float32", "eval_every=0", "fim_rate=0", "ckpt_every=0", "batch_size=4", "dropout=0"]


def _records(run_dir, kind: str = "train") -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if r.get("type") == kind]


def _small_corpus(tmp_path):
    from importlib import resources

    text = (resources.files("dsv3") / "data" / "tinyshakespeare.txt").read_text()[:40_000]
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return ["--data", str(path)]


@pytest.mark.parametrize(
    "schedule, layers",
    [("1f1b", 2), ("dualpipe", 2), ("dualpipev", 4)],  # DualPipe: both copies of 2 stages on each rank
)
def test_pipeline_run_equals_single_process_and_resumes(tmp_path, schedule, layers):
    common = [*COMMON, *_small_corpus(tmp_path)]
    sets = [*SETTINGS, f"num_hidden_layers={layers}", "eval_every=2", "eval_batches=2"]
    single, pipe = tmp_path / "single", tmp_path / "pp2"
    # the pipeline splits the batch of 4 into pp_microbatches = 2 x pp = 4 micro-batches of 1 sequence
    assert main(["train", *common, "--out", str(single), *sets, "micro_batch_size=1"]) == 0
    pp = [*sets, "pp=2", f"pp_schedule={schedule}"]
    assert main(["train", *common, "--out", str(pipe), "--stop-at", "2", "--nproc", "2", *pp]) == 0
    assert (pipe / "checkpoints" / "step_00000002" / state_file(1)).is_file()
    # each rank holds (and checkpoints) the weights of its own stages only
    from safetensors.torch import load_file

    held = []
    for r in (0, 1):
        shard = load_file(pipe / "checkpoints" / "step_00000002" / model_file(r))
        weights = {k for k in shard if "layers." in k and not k.endswith("correction_bias")}
        held.append({k for k in weights if shard[k].numel()})
    if schedule == "dualpipe":  # rank r holds stages r and 1 - r: both copies of the model
        assert held[0] == held[1] == weights
    else:
        assert held[0] and held[1] and not held[0] & held[1] and held[0] | held[1] == weights
    assert main(["train", *common, "--out", str(pipe), "--resume", "--nproc", "2", *pp]) == 0
    a, b = _records(single), _records(pipe)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "mtp_loss", "balance_loss"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-7), (key, ra[key], rb[key])
        assert math.isclose(ra["grad_norm"], rb["grad_norm"], rel_tol=1e-4)
        assert ra["expert_load"] == rb["expert_load"]  # every MoE layer's load, MTP block included
    # the evaluations (at step 2 and the final one) and the HF export see the whole trained model
    ea, eb = _records(single, "eval"), _records(pipe, "eval")
    assert [r["step"] for r in eb] == [r["step"] for r in ea] == [2, 3]
    for ra, rb in zip(ea, eb):
        assert math.isclose(ra["val_loss"], rb["val_loss"], rel_tol=1e-4)
    from dsv3.checkpoint import from_pretrained

    ma, mb = from_pretrained(single), from_pretrained(pipe)
    for (name, pa), (_, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert (pa - pb).abs().max() <= 1e-4, name


def test_bad_pipeline_layouts_are_rejected_before_any_rank_starts(tmp_path, capsys):
    out = tmp_path / "bad"
    cases = [
        (["pp=2", "ep=2"], "ep = 1"),
        (["pp=2", "dp=2", "batch_size=4", "pp_microbatches=4"], "batch_size"),
        (["pp=2", "batch_size=6"], "batch_size"),
        (["pp=2", "pp_schedule=dualpipe", "pp_microbatches=3"], "pp_schedule"),
        (["pp=2", "pp_schedule=dualpipev"], "layers"),  # 4 stages, debug has 2 layers
        (["pp=2", "pp_schedule=gpipe"], "pp_schedule"),
        (["--fp8", "pp=2"], "--fp8"),
    ]
    for extra, msg in cases:
        nproc = "4" if "ep=2" in extra or "dp=2" in extra else "2"
        assert main(["train", *COMMON, "--out", str(out), "--nproc", nproc, *extra]) == 2, extra
        assert msg in capsys.readouterr().err, extra
    assert not out.exists()


def test_pipeline_times_data_parallel_equals_single_process(tmp_path):
    """pp=2 x dp=2 on 4 ranks: each replica takes 2 of the 4 rows as 2 micro-batches of 1; the same numbers
    as one process with micro-batches of 1."""
    common = [*COMMON, *_small_corpus(tmp_path)]
    single, pipe = tmp_path / "single", tmp_path / "pp2dp2"
    assert main(["train", *common, "--out", str(single), *SETTINGS, "micro_batch_size=1"]) == 0
    sets = [*SETTINGS, "pp=2", "dp=2", "pp_microbatches=2"]
    assert main(["train", *common, "--out", str(pipe), "--nproc", "4", *sets]) == 0
    a, b = _records(single), _records(pipe)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-5), (ra["loss"], rb["loss"])
        assert math.isclose(ra["grad_norm"], rb["grad_norm"], rel_tol=1e-4)
        assert ra["expert_load"] == rb["expert_load"]
    ea, eb = _records(single, "eval")[-1], _records(pipe, "eval")[-1]
    assert math.isclose(ea["val_loss"], eb["val_loss"], rel_tol=1e-4)
