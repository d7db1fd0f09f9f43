"""Pipeline parallelism: schedules (1F1B, ZB1P, DualPipe, DualPipeV) as data, a simulator and a P2P runtime.

schedule = make_schedule("dualpipe", pp=4, num_microbatches=8)      # the one source of truth
simulate(schedule, Durations(F=1, B=2, W=1, FB=3)).bubble            # per-rank bubbles, Table 2
stages = build_stages(model, schedule.stages_of(rank), schedule.num_stages)
runtime = PipelineRuntime(schedule, stages, group=pp_group, loss_fn=..., overlap=threaded_overlap)
result = runtime.step(input_ids, labels)                             # exact losses vs sequential_step
sync_replicated_grads(stages, pp_group)                              # DualPipe's two copies, shared embed
"""

from dsv3.parallel.pipeline.runtime import (
    PipelineRuntime,
    sequential_overlap,
    sync_expert_counts,
    sync_replicated_grads,
    threaded_overlap,
)
from dsv3.parallel.pipeline.schedule import SCHEDULES, Action, Message, Schedule, make_schedule, table_bubble
from dsv3.parallel.pipeline.simulator import Durations, SimResult, plot_timeline, simulate
from dsv3.parallel.pipeline.stage import (
    PipelineStage,
    StepResult,
    build_stages,
    combine_losses,
    sequential_step,
    split_layers,
)
from dsv3.parallel.pipeline.wgrad import WeightGradStore, enable_weight_grad_split

__all__ = [
    "SCHEDULES",
    "Action",
    "Durations",
    "Message",
    "PipelineRuntime",
    "PipelineStage",
    "Schedule",
    "SimResult",
    "StepResult",
    "WeightGradStore",
    "build_stages",
    "combine_losses",
    "enable_weight_grad_split",
    "make_schedule",
    "plot_timeline",
    "sequential_overlap",
    "sequential_step",
    "simulate",
    "split_layers",
    "sync_expert_counts",
    "sync_replicated_grads",
    "table_bubble",
    "threaded_overlap",
]
