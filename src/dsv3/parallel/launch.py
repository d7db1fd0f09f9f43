"""Starting distributed runs: torchrun environment detection, `--nproc N` spawning with a watchdog.

- `init_distributed()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT) and initialises the default process group: NCCL with CUDA, gloo otherwise, always with a
  timeout, so a collective waiting for a dead peer raises instead of hanging forever.
- `spawn(cmd, nproc)` is what `dsv3 train --nproc N` runs: N local copies of the command with the same
  environment torchrun would give them. A watchdog polls the children; when one exits with an error, the
  others get `grace_s` seconds to fail on their own (their collectives error out), then are terminated,
  and the error names the rank that failed first.
- Process lifecycle. SIGTERM/SIGINT to the launcher is forwarded to every rank (a trainer then writes a
  checkpoint at the next step boundary and exits with `PREEMPTED_EXIT_CODE`, 128 + SIGTERM, the code
  schedulers and torchelastic read as "stopped by a signal"); ranks left running after `term_grace_s`
  are killed, and a second signal kills them at once. Ranks die with their launcher: each gets SIGTERM
  when the launcher dies (Linux parent-death signal), and `RankWatchdog` in each rank also notices being
  re-parented (any OS, and under torchrun).
- Frozen ranks. `RankWatchdog` publishes a heartbeat counter per rank in the rendezvous store (its own
  client connection, from a thread, so a rank busy in a long step still beats) and watches the next rank
  in a ring; a peer whose counter has not moved for `timeout_s` (SIGSTOP, a wedged driver) ends the job
  with an error naming it, long before the collective timeout would, under `--nproc` and torchrun alike.
- `run_local(fn, nproc)` runs fn(rank, world_size, *args) in N fresh processes over gloo on 127.0.0.1
  and returns their return values (tests and benchmarks), with an overall deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 128 + int(signal.SIGTERM)  # 143: stopped by a signal, state saved; restart to resume
UNRESPONSIVE_EXIT_CODE = 3  # a rank found a peer frozen (no heartbeat within the timeout)


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


def _prctl(option: int, arg: Any = 0) -> int:
    """Linux prctl(2); -1 where unavailable."""
    if not sys.platform.startswith("linux"):
        return -1
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0))
    except (OSError, AttributeError):
        return -1


def _parent_death_signal() -> int:
    """The signal this process gets when its parent dies (PR_GET_PDEATHSIG), 0 when none is set."""
    sig = ctypes.c_int(0)
    return sig.value if _prctl(2, ctypes.byref(sig)) == 0 else 0


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A Popen preexec_fn: SIGTERM this child when its parent dies (Linux PR_SET_PDEATHSIG); exit at once
    if the parent is already gone."""

    def setup() -> None:
        _prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(PREEMPTED_EXIT_CODE)

    return setup


class _Signals:
    """SIGTERM/SIGINT received by the launcher (main thread only), forwarded to the ranks as they come."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs, self.received = procs, []
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, sig: int, _frame: object) -> None:
        self.received.append(sig)
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGKILL if len(self.received) > 1 else sig)


def spawn(
    cmd: Sequence[str],
    nproc: int,
    *,
    extra_env: dict[str, str] | None = None,
    grace_s: float = 10.0,
    term_grace_s: float = 120.0,
    poll_s: float = 0.1,
    log: Callable[[str], None] | None = None,
) -> int:
    """Run `cmd` as nproc local ranks (torchrun's environment); return 0, or the first failure's code.

    A SIGTERM/SIGINT to this process is forwarded to the ranks, which get `term_grace_s` seconds to stop
    on their own (a trainer checkpoints first); the return value is then 128 + the signal."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    port = free_port()
    procs: list[subprocess.Popen] = []
    base = {**os.environ, **(extra_env or {})}
    with _Signals(procs) as signals:
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
            # own process group: a terminal's Ctrl-C reaches the launcher only, which forwards it once
            procs.append(
                subprocess.Popen(
                    list(cmd), env=env, process_group=0, preexec_fn=_die_with_parent(os.getpid())
                )
            )
        failed: tuple[int, int] | None = None
        deadline = float("inf")
        while True:
            codes = [p.poll() for p in procs]
            if signals.received and deadline == float("inf"):
                deadline = time.monotonic() + term_grace_s
                sig = signals.received[0]
                log(f"dsv3: signal {sig} received; stopping the ranks (they checkpoint first)")
            for r, c in enumerate(codes):
                if c not in (None, 0) and failed is None and not signals.received:
                    failed = (r, c)
                    # a frozen peer will not fail on its own: no grace then
                    deadline = time.monotonic() + (0.0 if c == UNRESPONSIVE_EXIT_CODE else grace_s)
                    log(f"dsv3: rank {r} exited with code {c}; stopping the other ranks")
            if all(c is not None for c in codes):
                break
            if time.monotonic() > deadline:
                _stop(procs, grace_s=1.0 if failed and failed[1] == UNRESPONSIVE_EXIT_CODE else 5.0)
                break
            time.sleep(poll_s)
    if signals.received:
        return 128 + signals.received[0]
    if failed is not None:
        log(f"dsv3: distributed run failed: rank {failed[0]} exited first with code {failed[1]}")
        return failed[1] if failed[1] > 0 else 1
    return 0


class StopSignals:
    """`with StopSignals() as stop:` (or `install()` ... `restore()`) records the first SIGTERM/SIGINT
    instead of dying (main thread only), so a loop can stop at its next boundary; a second signal gets the
    old behaviour (SIGTERM kills, Ctrl-C raises KeyboardInterrupt). `stop.agreed(device)`: whether any
    rank got one (collective)."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, sig: int, _frame: object) -> None:
        self.received = sig
        self.restore()

    def agreed(self, device: str | torch.device = "cpu") -> int | None:
        """The signal if this rank or any other received one, else None; every rank must call it at the
        same point (one scalar all-reduce when a process group is up)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received
        t = torch.tensor([float(self.received or 0)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) or None


class RankWatchdog:
    """A rank's lifecycle thread (see the module docstring): heartbeat in the rendezvous store, the next
    rank's heartbeat watched, the launcher's death noticed. `stop()` marks this rank done (a finished rank
    is not a frozen one)."""

    def __init__(self, env: DistEnv, timeout_s: float = 30.0, interval_s: float = 1.0):
        if timeout_s <= 0:
            raise ValueError(f"rank timeout must be > 0 seconds, got {timeout_s}")
        self.env, self.timeout_s, self.interval_s = env, timeout_s, interval_s
        self.parent = os.getppid()
        # read here, on the thread that will get it: the kernel keeps the parent-death signal per thread
        self.parent_death_signal = _parent_death_signal()
        self._stop = threading.Event()
        self._store: dist.TCPStore | None = None
        self._thread = threading.Thread(target=self._run, name="dsv3-rank-watchdog", daemon=True)

    def start(self) -> RankWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._store is not None:
            with contextlib.suppress(Exception):  # the store host may be gone already
                self._store.set(self._key(self.env.rank), "done")

    @staticmethod
    def _key(rank: int) -> str:
        return f"dsv3/heartbeat/{rank}"

    def _fail(self, msg: str) -> None:
        print(f"dsv3 (rank {self.env.rank}): {msg}; stopping the run", file=sys.stderr, flush=True)
        os._exit(UNRESPONSIVE_EXIT_CODE)

    def _run(self) -> None:
        e = self.env
        peer = (e.rank + 1) % e.world_size
        seen: tuple[str | None, float] = (None, time.monotonic())
        store_ok = time.monotonic()
        beat = 0
        while not self._stop.wait(self.interval_s if beat else 0.0):
            if os.getppid() != self.parent:  # the launcher died: stop as if it had sent SIGTERM
                if not self.parent_death_signal:  # (unless the kernel has sent it already)
                    os.kill(os.getpid(), signal.SIGTERM)
                self.parent = os.getppid()
            now = time.monotonic()
            try:
                if self._store is None:
                    wait = datetime.timedelta(seconds=max(1.0, self.timeout_s / 2))
                    self._store = dist.TCPStore(e.master_addr, e.master_port, is_master=False, timeout=wait)
                beat += 1
                self._store.set(self._key(e.rank), str(beat))
                key = self._key(peer)
                value = self._store.get(key).decode() if self._store.check([key]) else None
                store_ok = now
            except Exception as err:  # noqa: BLE001 - any store failure counts as silence
                if self._stop.is_set():
                    return
                if now - store_ok > self.timeout_s:
                    self._fail(
                        f"the rendezvous store at {e.master_addr}:{e.master_port} has not answered for "
                        f"{now - store_ok:.0f}s (rank 0 or the launcher frozen or gone: {err})"
                    )
                continue
            if value == "done" or peer == e.rank:
                continue
            if value != seen[0]:
                seen = (value, now)
            elif now - seen[1] > self.timeout_s:
                self._fail(f"rank {peer} has not responded for {now - seen[1]:.0f}s (frozen or stopped)")


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
