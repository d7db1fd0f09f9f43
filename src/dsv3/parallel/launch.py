"""Starting distributed runs: torchrun environment detection, `--nproc N` spawning with a watchdog.

- `init_distributed()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT) and initialises the default process group: NCCL with CUDA, gloo otherwise, always with a
  timeout, so a collective waiting for a dead peer raises instead of hanging forever.
- `spawn(cmd, nproc)` is what `dsv3 train --nproc N` runs: N local copies of the command with the same
  environment torchrun would give them. A watchdog polls the children; when one exits with an error, the
  others get `grace_s` seconds to fail on their own (their collectives error out), then are terminated,
  and the error names the rank that failed first.
- `run_local(fn, nproc)` runs fn(rank, world_size, *args) in N fresh processes over gloo on 127.0.0.1
  and returns their return values (tests and benchmarks), with an overall deadline.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def env_from_environ(environ: dict[str, str] | None = None) -> DistEnv | None:
    """The torchrun / `dsv3 train --nproc` environment, or None when not launched that way."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )
    except ValueError as e:
        raise ValueError(
            f"malformed distributed environment (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT): {e}"
        ) from e


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_distributed(timeout_s: float = 120.0, backend: str | None = None) -> DistEnv | None:
    """Initialise the default process group from the environment; None for a plain single process."""
    env = env_from_environ()
    if env is None:
        return None
    if dist.is_initialized():
        return env
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return env


def shutdown_distributed(synchronize: bool = True) -> None:
    """Leave the process group: a barrier first (no rank tears gloo down while a peer is still inside a
    collective, which can abort the peer with SIGABRT at exit), then destroy every group.

    synchronize=False after a failure, when a peer may be gone and the barrier would only wait."""
    if not dist.is_initialized():
        return
    if synchronize:
        with contextlib.suppress(Exception):  # a peer already left: nothing to wait for
            dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def spawn(
    cmd: Sequence[str],
    nproc: int,
    *,
    extra_env: dict[str, str] | None = None,
    grace_s: float = 10.0,
    poll_s: float = 0.1,
    log: Callable[[str], None] | None = None,
) -> int:
    """Run `cmd` as nproc local ranks (torchrun's environment); return 0, or the first failure's code."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    port = free_port()
    procs: list[subprocess.Popen] = []
    base = {**os.environ, **(extra_env or {})}
    for r in range(nproc):
        env = {
            **base,
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        procs.append(subprocess.Popen(list(cmd), env=env))
    failed: tuple[int, int] | None = None
    deadline = float("inf")
    try:
        while True:
            codes = [p.poll() for p in procs]
            for r, c in enumerate(codes):
                if c not in (None, 0) and failed is None:
                    failed = (r, c)
                    deadline = time.monotonic() + grace_s
                    log(f"dsv3: rank {r} exited with code {c}; stopping the other ranks")
            if all(c is not None for c in codes):
                break
            if time.monotonic() > deadline:
                _stop(procs, grace_s=5.0)
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _stop(procs, grace_s=5.0)
        raise
    if failed is not None:
        log(f"dsv3: distributed run failed: rank {failed[0]} exited first with code {failed[1]}")
        return failed[1] if failed[1] > 0 else 1
    return 0


# --------------------------------------------------------------------------- in-process workers (tests)
def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    args: tuple,
    out_dir: str,
    timeout_s: float,
    threads: int,
) -> None:
    torch.set_num_threads(threads)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    ok = False
    try:
        init_distributed(timeout_s=timeout_s, backend="gloo")
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        ok = True
    except BaseException:
        import traceback

        (Path(out_dir) / f"rank{rank}.err").write_text(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    finally:
        shutdown_distributed(synchronize=ok)


def _failure_report(out_dir: str, nproc: int, fallback: str) -> str:
    """Which rank failed first (by the time it wrote its error), with its traceback; then the others."""
    errs = []
    for r in range(nproc):
        f = Path(out_dir) / f"rank{r}.err"
        if f.is_file():
            stamp, _, trace = f.read_text().partition("\n")
            errs.append((float(stamp), r, trace))
    if not errs:
        return fallback.strip()
    errs.sort()
    _, first, trace = errs[0]
    msg = f"rank {first} of {nproc} failed first:\n{trace}"
    for _, r, t in errs[1:]:
        last = t.strip().splitlines()[-1] if t.strip() else "?"
        msg += f"\nthen rank {r}: {last}"
    return msg


def run_local(
    fn: Callable[..., Any],
    nproc: int,
    args: tuple = (),
    *,
    timeout_s: float = 120.0,
    collective_timeout_s: float = 60.0,
    threads: int = 1,
) -> list[Any]:
    """fn(rank, world_size, *args) in nproc fresh processes over gloo; their return values by rank.

    fn must be importable (a module-level function). A failing rank stops the others at once (the
    spawner's watchdog) and raises; the whole run is killed after timeout_s."""
    import multiprocessing

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    # a fork server that has imported torch (and run no kernel, so no OpenMP state) starts ranks in
    # milliseconds instead of re-importing torch in every spawned interpreter
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch.distributed", "dsv3.parallel"]
    )
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _worker,
            args=(fn, nproc, free_port(), args, out, collective_timeout_s, threads),
            nprocs=nproc,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if ctx.join(timeout=0.5, grace_period=2.0):
                    break
            except ProcessException as e:  # the watchdog stopped the other ranks already
                raise RuntimeError(_failure_report(out, nproc, str(e))) from None
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(
                    f"run_local: {fn.__name__} on {nproc} ranks did not finish in {timeout_s:.0f}s"
                )
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


# --------------------------------------------------------------------------- `--nproc N` for a function
def spawn_call(target: str, payload: Any, nproc: int, **kw: Any) -> int:
    """Run `module:function(payload)` on nproc local ranks (see `spawn`); payload travels pickled.

    Each rank runs `_call_main([module:function, FILE])`; the function's return value is the rank's exit
    code (a ValueError prints as a clean error, exit 2)."""
    import pickle

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "payload.pkl"
        f.write_bytes(pickle.dumps(payload))
        code = "import sys; from dsv3.parallel.launch import _call_main; sys.exit(_call_main(sys.argv[1:]))"
        return spawn([sys.executable, "-c", code, target, str(f)], nproc, **kw)


def _call_main(argv: list[str]) -> int:
    import importlib
    import pickle

    if len(argv) != 2 or ":" not in argv[0]:
        print("usage: _call_main([module:function, PAYLOAD_FILE])", file=sys.stderr)
        return 2
    module, _, name = argv[0].partition(":")
    fn = getattr(importlib.import_module(module), name)
    payload = pickle.loads(Path(argv[1]).read_bytes())
    rc = 1
    try:
        rc = int(fn(payload) or 0)
    except ValueError as e:
        print(f"dsv3 (rank {os.environ.get('RANK', '?')}): error: {e}", file=sys.stderr)
        rc = 2
    finally:
        shutdown_distributed(synchronize=rc == 0)
    return rc
