"""Training process lifecycle with real processes and real signals (debug preset, bounded time):
SIGTERM checkpoints at the step boundary and exits 143, the launcher forwards signals and its ranks die
with it, a frozen rank is named within --rank-timeout, bad settings are refused before training."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3.cli import main
from dsv3.parallel.launch import PREEMPTED_EXIT_CODE, UNRESPONSIVE_EXIT_CODE
from dsv3.train.checkpoint import list_checkpoints, verify_checkpoint
from dsv3.train.cli import build_configs
from dsv3.train.data import bundled_corpus_path
from dsv3.train.metrics import read_metrics

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, /proc")

LONG = ["--steps", "5000", "seq_len=32", "batch_size=4", "eval_every=0", "ckpt_every=0", "--no-sample"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "c.txt"
    p.write_text(bundled_corpus_path().read_text()[:30_000])
    return p


def _start(corpus: Path, out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dsv3.cli", "train", "--preset", "debug", "--data", str(corpus)]
    cmd += ["--out", str(out), "--no-progress", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_steps(p: subprocess.Popen, out: Path, n: int = 5, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()[0]
        recs = read_metrics(out) if (out / "metrics.jsonl").is_file() else []
        if sum(r["type"] == "train" for r in recs) >= n:
            return
        time.sleep(0.1)
    raise AssertionError("training did not start in time")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(x) for x in out.split())


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def _cleanup(*procs: subprocess.Popen, extra: list[int] | None = None):
    try:
        yield
    finally:
        for pid in [*(extra or []), *(p.pid for p in procs)]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(Exception):
                p.communicate(timeout=10)


def _last_step(out: Path) -> int:
    return max(r["step"] for r in read_metrics(out) if r["type"] == "train")


def test_sigterm_checkpoints_at_step_boundary_and_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    p = _start(corpus, out, *LONG)
    with _cleanup(p):
        _wait_for_steps(p, out)
        p.send_signal(signal.SIGTERM)
        text, _ = p.communicate(timeout=30)
    assert p.returncode == PREEMPTED_EXIT_CODE, text
    assert "stopped by signal 15" in text
    ckpts = list_checkpoints(out / "checkpoints")
    step = _last_step(out)
    assert [c.name for c in ckpts] == [f"step_{step:08d}"]  # the last step trained is the one saved
    verify_checkpoint(ckpts[-1])
    argv = ["train", "--preset", "debug", "--data", str(corpus), "--out", str(out), "--no-progress"]
    assert main([*argv, *LONG, "--resume", "--stop-at", str(step + 2)]) == 0
    assert [r["step"] for r in read_metrics(out) if r["type"] == "train"][-3:] == [step, step + 1, step + 2]


def test_launcher_forwards_sigterm_to_its_ranks(corpus, tmp_path):
    out = tmp_path / "run"
    p = _start(corpus, out, "--nproc", "2", "ep=2", *LONG)  # options after a setting: any order
    with _cleanup(p):
        _wait_for_steps(p, out)
        ranks = _children(p.pid)
        assert len(ranks) == 2
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        text, _ = p.communicate(timeout=60)
        assert time.monotonic() - t0 < 30
    assert p.returncode == PREEMPTED_EXIT_CODE, text
    assert not any(_alive(r) for r in ranks)
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts and ckpts[-1].name == f"step_{_last_step(out):08d}"
    verify_checkpoint(ckpts[-1])


def test_ranks_stop_when_the_launcher_is_killed(corpus, tmp_path):
    out = tmp_path / "run"
    p = _start(corpus, out, "--nproc", "2", *LONG)
    with _cleanup(p):
        _wait_for_steps(p, out)
        ranks = _children(p.pid)
        with _cleanup(extra=ranks):
            p.kill()  # kill -9: nothing can be forwarded
            deadline = time.monotonic() + 30
            while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not any(_alive(r) for r in ranks), "ranks outlived their launcher"
        text = p.stdout.read()
    ckpts = list_checkpoints(out / "checkpoints")  # they stopped as on SIGTERM: with a checkpoint
    assert "stopped by signal 15" in text, text
    assert ckpts and ckpts[-1].name == f"step_{_last_step(out):08d}"


def test_frozen_rank_is_named_within_the_timeout(corpus, tmp_path):
    out = tmp_path / "run"
    p = _start(corpus, out, "--nproc", "2", "--rank-timeout", "2", *LONG)
    ranks: list[int] = []
    with _cleanup(p, extra=ranks):
        _wait_for_steps(p, out)
        ranks += _children(p.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        t0 = time.monotonic()
        text, _ = p.communicate(timeout=60)
        took = time.monotonic() - t0
    assert p.returncode == UNRESPONSIVE_EXIT_CODE, text
    assert "rank 1 has not responded" in text
    assert took < 15, took
    assert not any(_alive(r) for r in ranks)


def test_seq_len_beyond_positions_and_option_order(corpus, tmp_path, capsys):
    argv = ["train", "--preset", "debug", "--data", str(corpus), "--out", str(tmp_path / "r")]
    assert main([*argv, "seq_len=1024", "--steps", "2"]) == 2
    assert "max_position_embeddings=512" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main([*argv, "lr=1e-3", "--steps", "2", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    model, train = build_configs("debug", ["max_position_embeddings=1024", "seq_len=1024"])
    assert train.seq_len == 1024 and model.max_position_embeddings == 1024  # an explicit extension
