"""Execute a pipeline `Schedule` over torch.distributed point-to-point communication.

Every rank of the pipeline group walks its own action list (schedule.actions[rank]):
- before an action it posts the receives of this action and of the next `lookahead` ones, each message
  in its own `batch_isend_irecv` and, per (source, destination) channel, strictly in the order the source
  sends them (`Schedule.channels`); tags number the messages of a channel, so gloo matches by tag and
  order-matching backends see the same order on both sides;
- it waits only for the messages the action consumes, runs the computation, and posts the sends of what
  it produced at once, never waiting for them until the end of the step. Since sends never block and a
  receive waits only for data its producer makes unconditionally, an order that `Schedule.validate`
  accepts (no rank waits on itself) cannot deadlock. That argument holds where sends progress in the
  background (gloo, tested here); NCCL runs one communicator's point-to-point kernels in order on one
  stream, which this runtime has not been validated against (no GPU was available);
- hand-offs between two stages of the same rank (DualPipeV's fold) stay in memory.

Backward: B runs the full backward of a chunk; I runs it with the weight gradients of the split layers
queued in the runtime's `WeightGradStore` (wgrad.py) under (micro-batch, stage); W runs that queue.
FB runs a forward and a full backward as one unit through the `overlap` hook, which gets two thunks
(their inputs already received, their outputs sent after both return) and decides how to interleave them.
`sequential_overlap` (the default) runs the forward, then the backward. `threaded_overlap` is DeepSeek's
overlap: the forward runs on a second thread while this one runs the backward, so while one of them
waits in an expert all-to-all (dispatch or combine of its micro-batch) the other computes. The two
threads' collectives go to two communicators over the same EP ranks (the backward's exchanges use
`Mesh.ep_grad_group`), so each communicator sees its collectives in the same order on every rank. The
arithmetic of each micro-batch is unchanged: losses are bit-identical to the sequential hook's.

Losses: the rank holding a micro-batch's last stage fills its row of the [N, 4] loss table; a sum
all-reduce over the group (every other rank contributes zeros, which adds exactly) gives every rank the
table, and the step loss is `combine_losses(table)` as in `sequential_step`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext

import torch
import torch.distributed as dist

from dsv3.model.transformer import lm_loss
from dsv3.parallel.pipeline.schedule import Action, Message, Schedule
from dsv3.parallel.pipeline.stage import (
    LossFn,
    PipelineStage,
    StepResult,
    loss_row,
    split_microbatches,
)
from dsv3.parallel.pipeline.wgrad import WeightGradStore, enable_weight_grad_split

OverlapFn = Callable[[Callable[[], None], Callable[[], None]], None]


def sequential_overlap(run_forward: Callable[[], None], run_backward: Callable[[], None]) -> None:
    """The default FB hook: the forward, then the backward."""
    run_forward()
    run_backward()


def threaded_overlap(run_forward: Callable[[], None], run_backward: Callable[[], None]) -> None:
    """The overlapping FB hook: the forward on a helper thread, the backward here, then join.

    The forward thread gets this thread's grad mode, autocast state and CUDA device (all thread-local). An
    exception on either side is raised here after both have finished. Stages with expert parallelism
    must come from `build_mesh` (it creates `ep_grad_group`): with one communicator for both threads the
    ranks could issue their collectives in different orders."""
    grad = torch.is_grad_enabled()
    cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    casts = [
        (dev, torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda") if torch.is_autocast_enabled(dev)
    ]
    errors: list[BaseException] = []

    def forward() -> None:
        try:
            if cuda_device is not None:  # the current device is per thread too
                torch.cuda.set_device(cuda_device)
            with ExitStack() as stack:
                stack.enter_context(torch.set_grad_enabled(grad))
                for dev, dtype in casts:
                    stack.enter_context(torch.autocast(dev, dtype=dtype))
                run_forward()
        except BaseException as e:  # re-raised on the calling thread
            errors.append(e)

    t = threading.Thread(target=forward, name="dsv3-fb-forward", daemon=True)
    t.start()
    try:
        run_backward()
    finally:
        t.join()
    if errors:
        raise errors[0]


class _Inbox:
    """A posted receive: the buffers of one message and the works to wait on."""

    def __init__(self, buffers: list[torch.Tensor], works: list) -> None:
        self.buffers, self.works = buffers, works

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        self.works = []
        return self.buffers


class PipelineRuntime:
    """Runs `schedule` on this rank's `stages` ({stage index: PipelineStage}) over `group`.

    loss_fn(out, labels) -> LossOutput runs on last stages (default: lm_loss with its defaults).
    split_weight_grads: make I/W real (else an I computes its weight gradients at once and W is empty).
    lookahead: how many later actions' receives to post ahead of time."""

    def __init__(
        self,
        schedule: Schedule,
        stages: dict[int, PipelineStage],
        group: dist.ProcessGroup | None = None,
        *,
        loss_fn: LossFn = lm_loss,
        overlap: OverlapFn = sequential_overlap,
        split_weight_grads: bool = True,
        lookahead: int = 1,
    ) -> None:
        if not dist.is_initialized():
            raise ValueError("PipelineRuntime needs torch.distributed to be initialised")
        self.group = group
        self.rank = dist.get_rank(group)
        size = dist.get_world_size(group)
        if size != schedule.num_ranks:
            raise ValueError(
                f"schedule {schedule.name} runs on {schedule.num_ranks} ranks "
                f"but the pipeline group has {size}"
            )
        mine = schedule.stages_of(self.rank)
        if sorted(stages) != mine:
            raise ValueError(
                f"rank {self.rank} must hold stages {mine} for {schedule.name}, got {sorted(stages)}"
            )
        for s, st in stages.items():
            if st.index != s or st.num_stages != schedule.num_stages:
                raise ValueError(
                    f"stage module {st.index}/{st.num_stages} given as stage {s}/{schedule.num_stages}"
                )
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.schedule = schedule
        self.stages = stages
        self.loss_fn = loss_fn
        self.overlap = overlap
        self.lookahead = lookahead
        self.store = WeightGradStore()
        if split_weight_grads:
            for st in stages.values():
                enable_weight_grad_split(st, self.store)
        self._plans = {False: self._plan(schedule), True: self._plan(schedule.forward_only())}
        # chunks whose backward is split into I and W: only their forwards record deferrable nodes
        self._split = {(a.mb, a.stage) for a in schedule.actions[self.rank] if a.kind == "I"}

    # ------------------------------------------------------------------ static plan
    def _plan(self, sched: Schedule) -> dict:
        """Receive order and tags per incoming channel, tags of outgoing messages."""
        src_of: dict[Message, tuple[int, int]] = {}  # message -> (source, tag)
        tag_out: dict[Message, int] = {}
        order_in: dict[int, list[Message]] = {}
        for (src, dst), msgs in sched.channels().items():
            for i, m in enumerate(msgs):
                if dst == self.rank:
                    src_of[m] = (src, i)
                    order_in.setdefault(src, []).append(m)
                if src == self.rank:
                    tag_out[m] = i
        return {"schedule": sched, "src_of": src_of, "tag_out": tag_out, "order_in": order_in}

    # ------------------------------------------------------------------ the step
    def step(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_outputs: bool = False,
        profile: bool = False,
    ) -> StepResult:
        """One step over input_ids [B, T] (and labels [B, T]) split into the schedule's micro-batches.

        Pass the same batch on every rank of the group. Under torch.no_grad() only forwards run. Gradients
        accumulate into the stages' parameters (scaled by 1/N), replicas not yet summed: call
        `sync_replicated_grads` before the optimizer step. Returns the loss table on every rank and, with
        return_outputs, the logits of the micro-batches whose last stage is on this rank."""
        training = torch.is_grad_enabled()
        if training and labels is None:
            raise ValueError("a training step needs labels (run under torch.no_grad() for forward only)")
        plan = self._plans[not training]
        sched: Schedule = plan["schedule"]
        N = sched.num_microbatches
        self._ids = split_microbatches(input_ids, N)
        self._labels = split_microbatches(labels, N) if labels is not None else None
        self._spec_args = (self._ids[0].shape[0], self._ids[0].shape[1], self._act_dtype())
        self._plan_now, self._training, self._return_outputs = plan, training, return_outputs
        self._next_post = {src: 0 for src in plan["order_in"]}
        self._inbox: dict[Message, _Inbox] = {}
        self._local: dict[Message, tuple[torch.Tensor, ...]] = {}
        self._produced: dict[Message, tuple[torch.Tensor, ...]] = {}
        self._inputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._outputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._losses: dict[tuple[int, int], torch.Tensor] = {}
        self._sends: list[tuple[list, tuple[torch.Tensor, ...]]] = []
        self._table = torch.zeros(N, 4)
        self._wait_s = 0.0
        self._result_outputs: dict[int, torch.Tensor] = {}
        self.store.clear()
        for st in self.stages.values():
            st.reset_expert_counts()
        actions = sched.actions[self.rank]
        timeline: list[tuple[str, float, float]] = []
        t0 = time.perf_counter()
        try:
            for i, action in enumerate(actions):
                for a in actions[i : i + 1 + self.lookahead]:
                    self._post_receives(sched.incoming(a))
                inputs = {m: self._take(m) for m in sched.incoming(action)}
                start = time.perf_counter()
                self._run(action, inputs)
                if profile:
                    timeline.append((str(action), start - t0, time.perf_counter() - t0))
                self._send(sched, action)
            t_end = time.perf_counter()
            for works, _ in self._sends:
                for w in works:
                    w.wait()
            self._wait_s += time.perf_counter() - t_end
        finally:
            self._sends, self._inbox, self._local, self._produced = [], {}, {}, {}
            self._inputs, self._outputs, self._losses = {}, {}, {}
        if len(self.store):
            raise RuntimeError("internal error: weight gradients left pending after the step")
        if labels is not None:
            t_sum = time.perf_counter()
            dist.all_reduce(self._table, group=self.group)
            self._wait_s += time.perf_counter() - t_sum
        wall = time.perf_counter() - t0
        return StepResult(
            losses=self._table,
            outputs=self._result_outputs,
            timeline=timeline,
            wall_s=wall,
            wait_s=self._wait_s,
        )

    def _act_dtype(self) -> torch.dtype:
        for st in self.stages.values():
            for p in st.parameters():
                if p.is_floating_point():
                    return p.dtype
        return torch.get_default_dtype()

    # ------------------------------------------------------------------ communication
    def _post_receives(self, msgs: list[Message]) -> None:
        """Post the receives of `msgs` (and every earlier message of their channels) not yet posted."""
        plan = self._plan_now
        for msg in msgs:
            if msg not in plan["src_of"]:
                continue  # produced on this rank
            src, tag = plan["src_of"][msg]
            while self._next_post[src] <= tag:
                k = self._next_post[src]
                self._inbox[plan["order_in"][src][k]] = self._irecv(plan["order_in"][src][k], src, k)
                self._next_post[src] += 1

    def _irecv(self, msg: Message, src: int, tag: int) -> _Inbox:
        stage = self.stages[msg.stage]
        spec = stage.input_spec if msg.kind == "act" else stage.output_spec
        bufs = [torch.empty(shape, dtype=dt) for shape, dt in spec(*self._spec_args)]
        ops = [
            dist.P2POp(dist.irecv, b, group=self.group, group_peer=src, tag=4 * tag + j)
            for j, b in enumerate(bufs)
        ]
        return _Inbox(bufs, dist.batch_isend_irecv(ops) if ops else [])

    def _take(self, msg: Message) -> tuple[torch.Tensor, ...]:
        if msg in self._local:
            return self._local.pop(msg)
        t0 = time.perf_counter()
        out = tuple(self._inbox.pop(msg).wait())
        self._wait_s += time.perf_counter() - t0
        return out

    def _send(self, sched: Schedule, action: Action) -> None:
        for dst, msg in sched.outgoing(self.rank, action):
            tensors = self._produced.pop(msg)
            if dst == self.rank:
                self._local[msg] = tensors
                continue
            tag = self._plan_now["tag_out"][msg]
            payload = tuple(t.contiguous() for t in tensors)
            ops = [
                dist.P2POp(dist.isend, t, group=self.group, group_peer=dst, tag=4 * tag + j)
                for j, t in enumerate(payload)
            ]
            self._sends.append((dist.batch_isend_irecv(ops) if ops else [], payload))

    # ------------------------------------------------------------------ computation
    def _run(self, action: Action, inputs: dict[Message, tuple[torch.Tensor, ...]]) -> None:
        if action.kind == "F":
            self._forward(action.mb, action.stage, inputs)
        elif action.kind in ("B", "I"):
            self._backward(action.mb, action.stage, inputs, split=action.kind == "I")
        elif action.kind == "W":
            self.store.run((action.mb, action.stage))
        elif action.kind == "FB":
            self.overlap(
                lambda: self._forward(action.mb, action.stage, inputs),
                lambda: self._backward(action.b_mb, action.b_stage, inputs, split=False),
            )
        else:
            raise ValueError(f"unknown action kind {action.kind!r}")

    def _forward(self, mb: int, s: int, inputs: dict[Message, tuple[torch.Tensor, ...]]) -> None:
        stage = self.stages[s]
        if stage.is_first:
            args: tuple[torch.Tensor, ...] = (self._ids[mb],)
        else:
            args = tuple(
                t.requires_grad_() if self._training and t.is_floating_point() else t
                for t in inputs[Message("act", mb, s)]
            )
        self.store.capture = self._training and (mb, s) in self._split
        try:
            out = stage(*args, input_ids=self._ids[mb])
        finally:
            self.store.capture = True
        if self._training:
            self._inputs[(mb, s)] = args
        if stage.is_last:
            if self._return_outputs:
                self._result_outputs[mb] = out.logits.detach()
            if self._labels is not None:
                lo = self.loss_fn(out, self._labels[mb])
                self._table[mb] = loss_row(lo)
                if self._training:
                    self._losses[(mb, s)] = lo.loss
            return
        if self._training:
            self._outputs[(mb, s)] = out
        self._produced[Message("act", mb, s + 1)] = tuple(t.detach() for t in out)

    def _backward(
        self, mb: int, s: int, inputs: dict[Message, tuple[torch.Tensor, ...]], split: bool
    ) -> None:
        stage = self.stages[s]
        N = self.schedule.num_microbatches
        if stage.is_last:
            roots, grads = [self._losses.pop((mb, s)) / N], None
        else:
            outs = self._outputs.pop((mb, s))
            received = inputs[Message("grad", mb, s)]
            if len(received) != len(outs):
                raise RuntimeError(f"stage {s}: {len(received)} output gradients for {len(outs)} outputs")
            pairs = [(o, g) for o, g in zip(outs, received) if o.requires_grad]
            roots, grads = [o for o, _ in pairs], [g for _, g in pairs]
        with self.store.defer((mb, s)) if split else nullcontext():
            torch.autograd.backward(roots, grads)
        args = self._inputs.pop((mb, s))
        if not stage.is_first:
            self._produced[Message("grad", mb, s - 1)] = tuple(
                a.grad if a.grad is not None else torch.zeros_like(a) for a in args
            )


def _sum_over_holders(
    tensors: dict[str, torch.Tensor], group: dist.ProcessGroup | None
) -> dict[str, torch.Tensor]:
    """name -> the sum of the same-named tensors of the (at most two) ranks holding that name.

    Collective over `group`. Each pair of ranks exchanges one flat buffer and both sides compute
    mine + theirs, which is the same number on both (addition commutes). Names held once are left out."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    names: list = [None] * size
    dist.all_gather_object(names, sorted(tensors), group=group)
    holders: dict[str, list[int]] = {}
    for r, lst in enumerate(names):
        for n in lst:
            holders.setdefault(n, []).append(r)
    shared_with: dict[int, list[str]] = {}
    for n, hs in sorted(holders.items()):
        if len(hs) > 2:
            raise ValueError(f"{n} is held by {len(hs)} pipeline ranks {hs}; at most two are supported")
        if len(hs) == 2 and rank in hs:
            shared_with.setdefault(hs[0] if hs[1] == rank else hs[1], []).append(n)
    out = {}
    for peer, ns in sorted(shared_with.items()):
        mine = torch.cat([tensors[n].reshape(-1) for n in ns])
        theirs = torch.empty_like(mine)
        ops = [
            dist.P2POp(dist.isend, mine, group=group, group_peer=peer),
            dist.P2POp(dist.irecv, theirs, group=group, group_peer=peer),
        ]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        total = mine + theirs
        offset = 0
        for n in ns:
            k = tensors[n].numel()
            out[n] = total[offset : offset + k].view_as(tensors[n]).clone()
            offset += k
    return out


def sync_replicated_grads(stages: dict[int, PipelineStage], group: dist.ProcessGroup | None = None) -> int:
    """Sum the gradients of parameters held by two ranks of the pipeline group: DualPipe's two copies of
    every stage, and the embedding the last stage shares with the first for MTP (or tied embeddings) when
    they sit on different ranks. Afterwards both copies hold the same gradient, so identical optimizer
    steps keep them identical. Collective over `group`; returns the number of parameters summed here."""
    params: dict[str, torch.Tensor] = {}
    for st in stages.values():
        for name, p in st.named_parameters():
            if name in params and params[name] is not p:
                raise ValueError(f"two local stages hold different tensors named {name}")
            params[name] = p
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    summed = _sum_over_holders(grads, group)
    for n, g in summed.items():
        params[n].grad = g
    return len(summed)


def sync_expert_counts(stages: dict[int, PipelineStage], group: dist.ProcessGroup | None = None) -> None:
    """Add up the per-step expert counts of the two copies of each stage (DualPipe: each copy routes only
    its direction's micro-batches), so the balance-bias update sees the whole batch on both copies."""
    counts = {f"stage{s}.expert_counts": st.expert_counts for s, st in stages.items()}
    for name, total in _sum_over_holders(counts, group).items():
        stages[int(name[5:].split(".")[0])].expert_counts.copy_(total)
