"""Pipeline schedules on CPU processes (gloo): step time and measured bubble fraction.

dsv3's 1F1B, ZB1P, DualPipe and DualPipeV against torch.distributed.pipelining's Schedule1F1B and
ScheduleDualPipeV on the same stages (the same module code, equal weights), the same micro-batches and the
same loss, in one run, alternating the variants every repetition; medians over repetitions.

- 1F1B, ZB1P, DualPipe and torch's 1F1B cut the model into P stages (P = processes); DualPipeV (ours and
  torch's) into 2P stages, two per process. DualPipe holds two copies of its stages (2x parameters).
- Step time: the slowest rank's wall time of one step (barrier before, max over ranks after). CPU time
  per step (process time summed over ranks, gloo's threads included) is reported too: it does not depend
  on how busy the machine is, so it compares the runtimes' work when wall times are noisy.
- Measured bubble fraction, one method for every variant: the time a rank spends blocked waiting for
  pipeline communication (receives, the final send completions, dsv3's loss all-reduce) divided by the
  step time, averaged over ranks. dsv3's runtime reports it (StepResult.wait_s); for torch's schedules
  the benchmark times its `_wait_batch_p2p`, through which all of their waits go. For dsv3 the profiled
  idle time (step - time inside actions) is reported too.
- The model is a small MoE dsv3 model without MTP and balance loss (torch's stages pass one tensor between
  stages, so the loss is the plain cross-entropy for both).

Caveat: processes share the machine's cores. With more processes than free cores a rank that is ready
may still wait for a core (counted as compute), and a rank that waits frees its core for the others,
which hides bubbles: measured fractions are then distorted and closer together than the table predicts.

    python benchmarks/pipeline.py [--nproc 4] [--microbatches 8] [--reps 5]

Last line: JSON {ours: dsv3 DualPipeV step s, baseline: torch ScheduleDualPipeV step s, ratio, unit, ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model import Transformer, lm_loss
from dsv3.parallel import run_local
from dsv3.parallel.pipeline import PipelineRuntime, build_stages, make_schedule, table_bubble


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_preset("debug").replace(
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.hidden // 2,
        q_lora_rank=args.hidden // 2,
        kv_lora_rank=args.hidden // 2,
        num_attention_heads=4,
        num_nextn_predict_layers=0,
        vocab_size=512,
    )


def _ce_loss(out, labels):
    return lm_loss(out, labels, mtp_weight=0.0, balance_alpha=0.0, balance="none")


class _TorchAdapter(nn.Module):
    """A dsv3 PipelineStage as torch.distributed.pipelining wants it: tensors in, one tensor out."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.stage(*args)
        return out.logits if self.stage.is_last else out[0]


def _torch_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


# ---------------------------------------------------------------------- variants
class Variant:
    def __init__(self, name: str, stages: dict, step) -> None:
        self.name, self.stages, self.step = name, stages, step


def _ours(name: str, pp: int, model: Transformer, rank: int, n: int, ids, labels, group) -> Variant:
    sched = make_schedule(name, pp, n)
    stages = build_stages(copy.deepcopy(model), sched.stages_of(rank), sched.num_stages, ship_stats=False)
    rt = PipelineRuntime(sched, stages, group=group, loss_fn=_ce_loss)
    v = Variant(f"dsv3 {name}", stages, None)
    v.step = lambda profile=False: rt.step(ids, labels, profile=profile)
    return v


def _theirs(kind: str, model: Transformer, rank: int, world: int, n: int, ids, labels, group) -> Variant:
    from torch.distributed.pipelining import PipelineStage as TorchStage
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleDualPipeV

    num_stages = world if kind == "1f1b" else 2 * world
    mine = [rank] if kind == "1f1b" else [rank, 2 * world - 1 - rank]
    stages = build_stages(copy.deepcopy(model), mine, num_stages, ship_stats=False)
    cfg, mb = model.config, ids.shape[0] // n
    T = ids.shape[1]
    hidden = torch.zeros(mb, T, cfg.hidden_size, requires_grad=True)  # metadata: these need gradients
    tstages = []
    for s in mine:
        inp = torch.zeros(mb, T, dtype=torch.long) if s == 0 else hidden
        out = torch.zeros(mb, T, cfg.vocab_size, requires_grad=True) if s == num_stages - 1 else hidden
        tstages.append(
            TorchStage(_TorchAdapter(stages[s]), s, num_stages, torch.device("cpu"), inp, out, group=group)
        )
    if kind == "1f1b":
        sched = Schedule1F1B(tstages[0], n_microbatches=n, loss_fn=_torch_ce)
    else:
        sched = ScheduleDualPipeV(tstages, n_microbatches=n, loss_fn=_torch_ce)
    first, last = 0 in mine, num_stages - 1 in mine

    def step(profile=False):
        args = (ids,) if first else ()
        kw = {"target": labels, "losses": []} if last else {}
        return sched.step(*args, **kw)

    return Variant(f"torch {'Schedule1F1B' if kind == '1f1b' else 'ScheduleDualPipeV'}", stages, step)


class _WaitClock:
    """Accumulates the time torch's pipeline schedules spend in `_wait_batch_p2p` (all their waits)."""

    def __init__(self) -> None:
        from torch.distributed.pipelining import schedules

        self.seconds = 0.0
        original = schedules._wait_batch_p2p

        def timed(work):
            t0 = time.perf_counter()
            original(work)
            self.seconds += time.perf_counter() - t0

        schedules._wait_batch_p2p = timed


def worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = model_config(args)
    model = Transformer(cfg)
    n = args.microbatches
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (n * args.mb, args.seq), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (n * args.mb, args.seq), generator=g)
    group = dist.group.WORLD
    variants = [
        _ours("1f1b", world, model, rank, n, ids, labels, group),
        _ours("zb1p", world, model, rank, n, ids, labels, group),
        _ours("dualpipe", world, model, rank, n, ids, labels, group),
        _ours("dualpipev", 2 * world, model, rank, n, ids, labels, group),
        _theirs("1f1b", model, rank, world, n, ids, labels, group),
        _theirs("dualpipev", model, rank, world, n, ids, labels, group),
    ]
    clock = _WaitClock()
    steps = {v.name: [] for v in variants}
    bubble = {v.name: [] for v in variants}
    idle = {v.name: [] for v in variants}
    cpu = {v.name: [] for v in variants}
    for rep in range(args.reps + 1):  # repetition 0 warms up; the order alternates every repetition
        for v in variants if rep % 2 == 0 else variants[::-1]:
            for st in v.stages.values():
                st.zero_grad(set_to_none=True)
            dist.barrier()
            clock.seconds = 0.0
            c0, t0 = time.process_time(), time.perf_counter()
            res = v.step(profile=True)
            wall, used = time.perf_counter() - t0, time.process_time() - c0
            dist.barrier()
            waited = res.wait_s if v.name.startswith("dsv3") else clock.seconds
            slowest = torch.tensor([wall])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            frac = torch.tensor([waited / slowest.item(), used])
            dist.all_reduce(frac)
            if rep == 0:
                continue
            steps[v.name].append(slowest.item())
            cpu[v.name].append(frac[1].item())
            bubble[v.name].append(frac[0].item() / world)
            if v.name.startswith("dsv3"):
                inside = sum(e - s for _, s, e in res.timeline)
                f = torch.tensor([1.0 - inside / slowest.item()])
                dist.all_reduce(f)
                idle[v.name].append(f.item() / world)
    med = statistics.median
    return {
        "step_s": {k: med(x) for k, x in steps.items()},
        "bubble_fraction": {k: med(x) for k, x in bubble.items()},
        "profiled_idle_fraction": {k: med(x) for k, x in idle.items() if x},
        "cpu_s": {k: med(x) for k, x in cpu.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=4, help="pipeline processes (even)")
    ap.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (>= 2 * nproc)")
    ap.add_argument("--mb", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (divisible by 2 * nproc)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.nproc % 2 or args.microbatches < 2 * args.nproc or args.microbatches % 2:
        raise SystemExit("need an even --nproc and an even --microbatches >= 2 * nproc (DualPipe)")
    if args.layers % (2 * args.nproc):
        raise SystemExit("--layers must be divisible by 2 * nproc (DualPipeV's stages)")
    out = run_local(worker, args.nproc, (args,), timeout_s=1800, collective_timeout_s=600)[0]
    steps, frac = out["step_s"], out["bubble_fraction"]
    print(f"{'variant':<26} {'step s':>8} {'CPU s':>8} {'bubble':>8} {'profiled idle':>14}")
    for k in steps:
        idle = out["profiled_idle_fraction"].get(k)
        idle_s = "" if idle is None else f"{idle:>14.3f}"
        print(f"{k:<26} {steps[k]:>8.3f} {out['cpu_s'][k]:>8.3f} {frac[k]:>8.3f} {idle_s}")
    P, N = args.nproc, args.microbatches
    # the table's prediction as a fraction of a step, with F=1, B=2, W=1, F&B=F+B (no overlap gain on CPU)
    # for a 1/P chunk of the model; DualPipeV's chunks are 1/(2P), so its times are halved
    pred = {}
    for name, pp, k in (("1f1b", P, 1.0), ("zb1p", P, 1.0), ("dualpipe", P, 1.0), ("dualpipev", 2 * P, 0.5)):
        b = table_bubble(name, pp, k * 1.0, k * 2.0, k * 1.0, k * 3.0)
        pred[name] = b / (b + 3.0 * N)
    ours, theirs = steps["dsv3 dualpipev"], steps["torch ScheduleDualPipeV"]
    order = [frac[f"dsv3 {k}"] for k in ("1f1b", "zb1p", "dualpipe")]
    print(
        json.dumps(
            {
                "ours": ours,
                "baseline": theirs,
                "ratio": ours / theirs,
                "unit": "s/step (dsv3 DualPipeV vs torch ScheduleDualPipeV)",
                "ratio_1f1b": steps["dsv3 1f1b"] / steps["torch Schedule1F1B"],
                "step_s": steps,
                "cpu_s_per_step_all_ranks": out["cpu_s"],
                "bubble_fraction": frac,
                "profiled_idle_fraction": out["profiled_idle_fraction"],
                "table_bubble_fraction": pred,
                "bubbles_ordered_as_table": order[0] >= order[1] >= order[2],
                "nproc": P,
                "microbatches": N,
            }
        )
    )


if __name__ == "__main__":
    main()
