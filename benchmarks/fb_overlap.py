"""DualPipe's F&B overlap with expert parallelism: sequential vs threaded FB hook, same run.

PP=2 x EP=2 on 4 CPU processes (gloo): a small MoE dsv3 model cut into DualPipe stages, its routed
experts split over the 2 EP ranks of each stage. Each step runs DualPipe with N micro-batches; its
main phase is F&B pairs. Two variants alternate every repetition on the same stages and batches:

- `sequential`: the pair's forward, then its backward (`sequential_overlap`);
- `threaded`: the forward on a second thread while the backward runs (`threaded_overlap`), so the
  time one of them spends blocked in an expert all-to-all (waiting for the peer rank's tokens) is
  spent computing the other. The backward's exchanges use the mesh's second EP communicator.

Reported per variant (medians over repetitions): step time (slowest rank), and the time the ranks
spend inside expert all-to-alls (`all_to_all_single` on the EP communicators, both threads, mean over
ranks) as a fraction of the step. Losses of the two variants are checked to be identical.

Caveat: the processes share the machine's cores (4 processes x 2 threads on 2 cores here), so a thread
that waits in an all-to-all frees a core for another *process* too, which hides part of the waiting for
the sequential variant as well.

    python benchmarks/fb_overlap.py [--microbatches 8] [--reps 5]

Last line: JSON {ours: threaded s/step, baseline: sequential s/step, ratio: ours / baseline, unit, ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch
import torch.distributed as dist

from dsv3.model import Transformer, lm_loss
from dsv3.parallel import ParallelConfig, build_mesh, parallelize, run_local
from dsv3.parallel.pipeline import (
    PipelineRuntime,
    build_stages,
    make_schedule,
    sequential_overlap,
    threaded_overlap,
)
from pipeline import model_config  # benchmarks/pipeline.py (this script's folder is on sys.path)


class _CommClock:
    """Seconds spent inside `dist.all_to_all_single` on the given groups, summed over threads."""

    def __init__(self, groups: list) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()
        original = dist.all_to_all_single

        def timed(*args, **kw):
            if kw.get("group") not in groups:
                return original(*args, **kw)
            t0 = time.perf_counter()
            out = original(*args, **kw)
            if kw.get("async_op"):
                out.wait()
            with self._lock:
                self.seconds += time.perf_counter() - t0
            return out

        dist.all_to_all_single = timed


def worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    mesh = build_mesh(ParallelConfig(pp=2, ep=2))
    torch.manual_seed(0)
    # the pipeline benchmark's model (no MTP), with V3-style routing: 16 experts in 4 groups, top-4
    cfg = model_config(args).replace(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    model = Transformer(cfg)
    n = args.microbatches
    g = torch.Generator().manual_seed(1 + mesh.ep_rank)  # each EP rank its own tokens
    ids = torch.randint(0, cfg.vocab_size, (n * args.mb, args.seq), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (n * args.mb, args.seq), generator=g)
    sched = make_schedule("dualpipe", 2, n)
    pp_rank = dist.get_rank(mesh.pp_group)
    stages = build_stages(model, sched.stages_of(pp_rank), sched.num_stages)
    for st in stages.values():
        parallelize(st, mesh=mesh)
    clock = _CommClock([mesh.ep_group, mesh.ep_grad_group])
    variants = {
        "sequential": PipelineRuntime(
            sched, stages, group=mesh.pp_group, loss_fn=lm_loss, overlap=sequential_overlap
        ),  # fmt: skip
        "threaded": PipelineRuntime(
            sched, stages, group=mesh.pp_group, loss_fn=lm_loss, overlap=threaded_overlap
        ),  # fmt: skip
    }
    steps = {k: [] for k in variants}
    comm = {k: [] for k in variants}
    losses = {}
    for rep in range(args.reps + 1):  # repetition 0 warms up; the order alternates
        for name in list(variants) if rep % 2 == 0 else list(variants)[::-1]:
            for st in stages.values():
                st.zero_grad(set_to_none=True)
            dist.barrier()
            clock.seconds = 0.0
            t0 = time.perf_counter()
            res = variants[name].step(ids, labels)
            wall = time.perf_counter() - t0
            dist.barrier()
            slowest = torch.tensor([wall])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            c = torch.tensor([clock.seconds])
            dist.all_reduce(c)
            losses[name] = res.losses
            if rep:
                steps[name].append(slowest.item())
                comm[name].append(c.item() / world / slowest.item())
    med = statistics.median
    return {
        "step_s": {k: med(v) for k, v in steps.items()},
        "a2a_fraction": {k: med(v) for k, v in comm.items()},
        "losses_equal": bool(torch.equal(losses["sequential"], losses["threaded"])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (even, >= 4)")
    ap.add_argument("--mb", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (divisible by 4)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    out = run_local(worker, 4, (args,), timeout_s=1800, collective_timeout_s=600, threads=args.threads)[0]
    steps, frac = out["step_s"], out["a2a_fraction"]
    print(f"{'FB hook':<12} {'step s':>8} {'in all-to-all':>14}")
    for k in steps:
        print(f"{k:<12} {steps[k]:>8.3f} {frac[k]:>14.3f}")
    ours, base = steps["threaded"], steps["sequential"]
    print(
        json.dumps(
            {
                "benchmark": "fb_overlap",
                "ours": ours,
                "baseline": base,
                "ratio": ours / base,
                "unit": "s/step (DualPipe PP=2 x EP=2: threaded vs sequential F&B hook)",
                "a2a_fraction": frac,
                "losses_equal": out["losses_equal"],
                "microbatches": args.microbatches,
            }
        )
    )


if __name__ == "__main__":
    main()
