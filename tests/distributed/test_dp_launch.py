"""Launching: a dead or stuck rank ends the run with a clear error in bounded time; checkpoints stay whole."""

from __future__ import annotations

import sys
import time

import pytest
import torch
import torch.distributed as dist

from dsv3.parallel import Mesh, ParallelConfig, run_local, spawn
from dsv3.parallel.launch import env_from_environ
from dsv3.train.checkpoint import (
    MODEL_FILE,
    latest_good_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def _dies_during_save(rank: int, world: int, root: str) -> None:
    mesh = Mesh(config=ParallelConfig(dp=world), rank=rank, dp_rank=rank, world_group=dist.group.WORLD)
    save_checkpoint(root, 1, {"w": torch.full((3,), float(rank))}, {"step": 1}, mesh=mesh)
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    save_checkpoint(root, 2, {"w": torch.zeros(3)}, {"step": 2}, mesh=mesh)


def test_dead_rank_stops_the_run_and_leaves_no_partial_checkpoint(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(Exception, match="rank 1 fails on purpose"):
        run_local(_dies_during_save, 2, args=(str(tmp_path),), timeout_s=60, collective_timeout_s=30)
    assert time.monotonic() - t0 < 45
    assert not (tmp_path / "step_00000002").exists()
    assert latest_good_checkpoint(tmp_path) == tmp_path / "step_00000001"
    mesh = Mesh(config=ParallelConfig(dp=2), rank=1, dp_rank=1)
    model_state, state = load_checkpoint(tmp_path / "step_00000001", mesh)
    assert state == {"step": 1} and torch.equal(model_state["w"], torch.ones(3))
    with pytest.raises(ValueError, match="same layout"):
        load_checkpoint(tmp_path / "step_00000001", Mesh.single())


def _stuck_peer(rank: int, world: int) -> None:
    if rank == 1:
        time.sleep(60)  # alive but never joins the collective
    dist.all_reduce(torch.ones(1))


def test_collective_timeout_turns_a_hang_into_an_error():
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - gloo's timeout error type varies across versions
        run_local(_stuck_peer, 2, timeout_s=50, collective_timeout_s=3)
    assert time.monotonic() - t0 < 40


def test_corrupt_checkpoint_is_detected_and_skipped(tmp_path):
    mesh = Mesh.single()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"x": torch.arange(10) * step}, {"step": step}, mesh=mesh)
    assert latest_good_checkpoint(tmp_path, mesh) == tmp_path / "step_00000002"
    f = tmp_path / "step_00000002" / MODEL_FILE
    f.write_bytes(f.read_bytes()[:-20])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        verify_checkpoint(tmp_path / "step_00000002")
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(tmp_path / "step_00000002", mesh)
    assert latest_good_checkpoint(tmp_path, mesh, warn=lambda m: None) == tmp_path / "step_00000001"
    (tmp_path / ".tmp-step_00000003").mkdir()  # a save that never finished
    assert latest_good_checkpoint(tmp_path, mesh, warn=lambda m: None) == tmp_path / "step_00000001"


def test_spawn_watchdog_stops_survivors_when_a_rank_dies():
    code = "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(3)\ntime.sleep(60)\n"
    msgs: list[str] = []
    t0 = time.monotonic()
    rc = spawn([sys.executable, "-c", code], 3, grace_s=1.0, log=msgs.append)
    assert rc == 3
    assert time.monotonic() - t0 < 20
    assert any("rank 1 exited with code 3" in m for m in msgs)


def test_spawn_sets_the_torchrun_environment(tmp_path):
    code = (
        "import os, pathlib\n"
        "e = os.environ\n"
        f"pathlib.Path(r'{tmp_path}', e['RANK']).write_text("
        "' '.join([e['WORLD_SIZE'], e['LOCAL_RANK'], e['MASTER_ADDR'], e['MASTER_PORT']]))\n"
    )
    assert spawn([sys.executable, "-c", code], 2) == 0
    got = [(tmp_path / str(r)).read_text().split() for r in range(2)]
    assert got[0][:3] == ["2", "0", "127.0.0.1"] and got[1][:3] == ["2", "1", "127.0.0.1"]
    assert got[0][3] == got[1][3]
    env = env_from_environ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (1, 2, 1, 1234)
    assert env_from_environ({}) is None
    with pytest.raises(ValueError, match="malformed"):
        env_from_environ({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="nproc"):
        spawn([sys.executable, "-c", "pass"], 0)
