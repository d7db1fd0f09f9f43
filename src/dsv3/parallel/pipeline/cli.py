"""`dsv3 plan pipeline`: simulate a pipeline schedule and compare it with the paper's Table 2."""

from __future__ import annotations

import argparse
import json

from dsv3.parallel.pipeline.schedule import SCHEDULES, make_schedule, table_activations
from dsv3.parallel.pipeline.simulator import Durations, SimResult, plot_timeline, simulate

PP_HELP = (
    "PP as in the paper's Table 2: pipeline ranks for 1f1b, zb1p and dualpipe (each dualpipe rank holds "
    "two stages); for dualpipev it counts STAGES, which run on pp/2 devices (two stages per device), so "
    "every schedule's bubble is the table's formula with the same PP"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", choices=SCHEDULES, default="dualpipe", help="pipeline schedule")
    parser.add_argument("--pp", type=int, default=8, help=PP_HELP)
    parser.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help="micro-batches per step (default 2*pp; dualpipe needs an even count >= 2*pp)",
    )
    parser.add_argument("--f", type=float, default=1.0, help="forward chunk time F (default 1)")
    parser.add_argument("--b", type=float, default=2.0, help="full backward chunk time B (default 2)")
    parser.add_argument("--w", type=float, default=1.0, help="weight-gradient part W of B (default 1)")
    parser.add_argument(
        "--fb", type=float, default=None, help="overlapped forward+backward pair F&B (default F+B)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--png", default=None, metavar="FILE", help="draw the timeline (like the paper's Figure 5)"
    )


def exactness(result: SimResult) -> str:
    """When the Table 2 formula is exact for these durations (REFERENCE.md)."""
    d, name = result.durations, result.schedule.name
    if name == "1f1b":
        return "exact on every rank"
    if name == "zb1p":
        ok = min(d.F, d.B - d.W) >= d.W
        return "exact on every rank (W <= min(F, B-W))" if ok else "approximate here (needs W <= min(F, B-W))"
    ok = d.F == d.B - d.W and d.W <= d.B - d.W
    return (
        "the worst rank, exact here (F = B-W, W <= B-W)"
        if ok
        else "an approximation here (exact when F = B-W)"
    )


def run(args: argparse.Namespace) -> int:
    n = args.microbatches if args.microbatches is not None else 2 * args.pp
    schedule = make_schedule(args.schedule, args.pp, n)
    result = simulate(schedule, Durations(args.f, args.b, args.w, args.fb))
    if args.png:
        plot_timeline(result, args.png)
    if args.json:
        d = result.to_dict()
        d["table_exactness"] = exactness(result)
        print(json.dumps(d))
        return 0
    s, d = schedule, result.durations
    print(
        f"{s.name}: pp={s.pp}, {s.num_ranks} devices, {s.num_stages} stages, "
        f"{s.num_microbatches} micro-batches; F={d.F:g} B={d.B:g} W={d.W:g} F&B={d.fb:g}"
    )
    print(f"{'device':>6}  {'stages':>10}  {'busy':>9}  {'bubble':>9}  {'activations':>11}  {'params':>6}")
    for r in range(s.num_ranks):
        stages = ",".join(map(str, s.stages_of(r)))
        print(
            f"{r:>6}  {stages:>10}  {result.busy[r]:>9.3f}  {result.bubble[r]:>9.3f}  "
            f"{result.activations[r]:>11}  {result.params[r]:>5g}x"
        )
    print(f"makespan {result.makespan:g}; max bubble {max(result.bubble):g}")
    print(f"Table 2 bubble {result.table_bubble:g}: {exactness(result)}")
    print(
        f"Table 2 activations {table_activations(s.name, s.pp)} (peak here {max(result.activations)}), "
        "in micro-batch x stage units; params in units of model/PP"
    )
    if args.png:
        print(f"timeline written to {args.png}")
    return 0
