"""Pipeline schedules as data: one engine for 1F1B, ZB1P, DualPipe and DualPipeV.

A schedule is, for every pipeline rank, the ordered list of computations it runs in one training step.
The simulator (`simulator.py`) and the runtime (`runtime.py`) execute the very same `Schedule` objects,
so the picture, the bubble numbers and the distributed step cannot drift apart.

Action kinds (torch.distributed.pipelining's letters):
    F   forward of (micro-batch, stage)
    B   full backward of (micro-batch, stage): input and weight gradients
    I   input-gradient half of a backward; its weight gradient is deferred to a later W (zero bubble)
    W   weight-gradient half of an earlier I on the same (micro-batch, stage)
    FB  the forward of one (micro-batch, stage) and the full backward of another, run as one unit so that
        the communication of one hides behind the computation of the other (DualPipe's overlapped pair)
Durations follow the paper's Table 2: F, B (full backward), W, F&B; an I takes B - W.

Placement: micro-batch m belongs to route `mb_route[m]`, and `routes[d][s]` is the rank that holds stage s
for route d. 1F1B and ZB1P have one route (stage s on rank s). DualPipe has two: micro-batches 0..N/2-1
enter at rank 0 (stage s on rank s), N/2..N-1 enter at rank PP-1 (stage s on rank PP-1-s), so rank r holds
stages r and PP-1-r and every stage exists twice. DualPipeV ("cut in half") runs PP stages on PP/2 ranks
with one route shaped like a V: rank r holds stages r and PP-1-r, the hand-off between stages PP/2-1 and
PP/2 stays on the last rank.

DualPipe and DualPipeV share one rank program (DeepSeek's eight steps, `_dual_program`) written over local
phases 0 and 1; the two schedules differ only in how phases bind to (stage, micro-batch).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
KINDS = ("F", "B", "I", "W", "FB")


@dataclass(frozen=True)
class Action:
    """One unit of work on a rank. For FB, (mb, stage) is the forward half, (b_mb, b_stage) the backward."""

    kind: str
    mb: int
    stage: int
    b_mb: int = -1
    b_stage: int = -1

    def parts(self) -> tuple[Action, ...]:
        """An FB pair as its (F, B) halves; any other action as itself."""
        if self.kind == "FB":
            return Action("F", self.mb, self.stage), Action("B", self.b_mb, self.b_stage)
        return (self,)

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"FB({self.mb}s{self.stage},{self.b_mb}s{self.b_stage})"
        return f"{self.kind}{self.mb}s{self.stage}"


class Message(NamedTuple):
    """A tensor bundle crossing ranks: the activation entering `stage` or the gradient leaving it downward.

    kind "act": output of F(mb, stage - 1), consumed by F(mb, stage).
    kind "grad": input gradient of B/I(mb, stage + 1), consumed by B/I(mb, stage)."""

    kind: str
    mb: int
    stage: int


@dataclass(frozen=True)
class Schedule:
    name: str
    pp: int  # the PP of the paper's table (pipeline stages; for DualPipeV twice the ranks)
    num_ranks: int
    num_stages: int
    num_microbatches: int
    routes: tuple[tuple[int, ...], ...]  # routes[d][stage] -> rank
    mb_route: tuple[int, ...]  # micro-batch -> route
    actions: tuple[tuple[Action, ...], ...]  # per rank, in execution order

    # ------------------------------------------------------------------ placement
    def rank_of(self, mb: int, stage: int) -> int:
        return self.routes[self.mb_route[mb]][stage]

    def stages_of(self, rank: int) -> list[int]:
        """Stage modules rank holds (DualPipe: two distinct stages, each also held by the mirror rank)."""
        return sorted({s for route in self.routes for s, r in enumerate(route) if r == rank})

    def holders(self, stage: int) -> list[int]:
        """Ranks holding a copy of `stage` (two for DualPipe)."""
        return sorted({route[stage] for route in self.routes})

    def microbatches_of(self, rank: int, stage: int) -> list[int]:
        return [m for m in range(self.num_microbatches) if self.rank_of(m, stage) == rank]

    # ------------------------------------------------------------------ derived schedules
    def forward_only(self) -> Schedule:
        """The same order without backward work (for a no-grad step): FB keeps its F half."""
        acts = tuple(
            tuple(a.parts()[0] for a in rank_actions if a.kind in ("F", "FB"))
            for rank_actions in self.actions
        )
        return replace(self, actions=acts)

    # ------------------------------------------------------------------ communication
    def outgoing(self, rank: int, action: Action) -> list[tuple[int, Message]]:
        """(destination rank, message) for what `action` produces, in the order the runtime sends it.

        Hand-offs to a stage on the same rank are included with destination == rank (no communication)."""
        out = []
        for part in action.parts():
            if part.kind == "F" and part.stage < self.num_stages - 1:
                out.append((self.rank_of(part.mb, part.stage + 1), Message("act", part.mb, part.stage + 1)))
            elif part.kind in ("B", "I") and part.stage > 0:
                out.append((self.rank_of(part.mb, part.stage - 1), Message("grad", part.mb, part.stage - 1)))
        return out

    def incoming(self, action: Action) -> list[Message]:
        """Messages `action` consumes (from this rank or another)."""
        need = []
        for part in action.parts():
            if part.kind == "F" and part.stage > 0:
                need.append(Message("act", part.mb, part.stage))
            elif part.kind in ("B", "I") and part.stage < self.num_stages - 1:
                need.append(Message("grad", part.mb, part.stage))
        return need

    def channels(self) -> dict[tuple[int, int], list[Message]]:
        """(src, dst) -> messages in the order src sends them. Receivers post receives in this order, which
        keeps point-to-point matching correct on backends that match by order alone (NCCL)."""
        chans: dict[tuple[int, int], list[Message]] = {}
        for src, rank_actions in enumerate(self.actions):
            for a in rank_actions:
                for dst, msg in self.outgoing(src, a):
                    if dst != src:
                        chans.setdefault((src, dst), []).append(msg)
        return chans

    # ------------------------------------------------------------------ checks
    def validate(self) -> Schedule:
        """Every (micro-batch, stage) has exactly one forward and one complete backward on its rank, each W
        follows its I, and the order is executable (no rank waits on itself): raise ValueError otherwise."""
        if len(self.actions) != self.num_ranks:
            raise ValueError(
                f"schedule {self.name}: {len(self.actions)} rank programs for {self.num_ranks} ranks"
            )
        fwd, bwd, inp, wgt = set(), set(), set(), set()
        forward_only = all(a.kind == "F" for acts in self.actions for a in acts)
        for rank, acts in enumerate(self.actions):
            for a in acts:
                for p in a.parts():
                    key = (p.mb, p.stage)
                    if self.rank_of(*key) != rank:
                        raise ValueError(
                            f"schedule {self.name}: {p} on rank {rank}, placed on {self.rank_of(*key)}"
                        )
                    target = {"F": fwd, "B": bwd, "I": inp, "W": wgt}[p.kind]
                    if key in target:
                        raise ValueError(f"schedule {self.name}: {p} appears twice")
                    if p.kind == "W" and key not in inp:
                        raise ValueError(f"schedule {self.name}: {p} before its I on rank {rank}")
                    target.add(key)
        everything = {(m, s) for m in range(self.num_microbatches) for s in range(self.num_stages)}
        if fwd != everything:
            raise ValueError(f"schedule {self.name}: forwards missing for {sorted(everything - fwd)[:4]}")
        if not forward_only and (bwd & inp or (bwd | inp) != everything or wgt != inp):
            raise ValueError(
                f"schedule {self.name}: every (micro-batch, stage) needs one B, or one I and one W"
            )
        topological_order(self)  # raises on a deadlock
        return self


def produces(part: Action) -> list[tuple[str, int, int]]:
    """Events a single computation completes: ("F", m, s) forward output, ("G", m, s) input gradient,
    ("W", m, s) weight gradient. A full B gives both G and W."""
    m, s = part.mb, part.stage
    return {"F": [("F", m, s)], "B": [("G", m, s), ("W", m, s)], "I": [("G", m, s)], "W": [("W", m, s)]}[
        part.kind
    ]


def dependencies(schedule: Schedule, part: Action) -> list[tuple[str, int, int]]:
    """Events a single computation (F, B, I or W) waits for, besides the previous action on its rank."""
    m, s = part.mb, part.stage
    if part.kind == "F":
        return [("F", m, s - 1)] if s > 0 else []
    if part.kind in ("B", "I"):
        return [("F", m, s)] + ([("G", m, s + 1)] if s < schedule.num_stages - 1 else [])
    if part.kind == "W":
        return [("G", m, s)]
    raise ValueError(f"unknown action kind {part.kind!r}")


def action_dependencies(schedule: Schedule, action: Action) -> list[tuple[str, int, int]]:
    """Dependencies of a whole action; an FB pair's halves do not wait on each other."""
    inside = {e for p in action.parts() for e in produces(p)}
    return [d for p in action.parts() for d in dependencies(schedule, p) if d not in inside]


def topological_order(schedule: Schedule) -> list[tuple[int, int]]:
    """(rank, index) of every action in an order respecting both rank order and data dependencies.

    Raises ValueError naming the stuck actions if the schedule deadlocks."""
    done: set[tuple[str, int, int]] = set()
    ptr = [0] * schedule.num_ranks
    order = []
    total = sum(len(a) for a in schedule.actions)
    while len(order) < total:
        progressed = False
        for r, acts in enumerate(schedule.actions):
            while ptr[r] < len(acts) and all(d in done for d in action_dependencies(schedule, acts[ptr[r]])):
                done.update(e for p in acts[ptr[r]].parts() for e in produces(p))
                order.append((r, ptr[r]))
                ptr[r] += 1
                progressed = True
        if not progressed:
            stuck = [str(acts[ptr[r]]) for r, acts in enumerate(schedule.actions) if ptr[r] < len(acts)]
            raise ValueError(f"schedule {schedule.name} deadlocks: ranks wait at {stuck}")
    return order


# ====================================================================== generators
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_requirements(name: str, pp: int, num_microbatches: int) -> None:
    """The up-front checks of every schedule (ValueError with the reason)."""
    _check(name in SCHEDULES, f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    _check(isinstance(pp, int) and pp >= 1, f"pp must be a positive integer, got {pp!r}")
    N = num_microbatches
    _check(
        isinstance(N, int) and N >= 1, f"the number of micro-batches must be a positive integer, got {N!r}"
    )
    if name in ("1f1b", "zb1p"):
        _check(pp <= N, f"{name} needs at least pp={pp} micro-batches to reach its steady state, got {N}")
    elif name == "dualpipe":
        _check(pp % 2 == 0, f"dualpipe needs an even pp (rank r holds stages r and pp-1-r), got {pp}")
        _check(
            N % 2 == 0, f"dualpipe needs an even number of micro-batches (half enter from each end), got {N}"
        )
        _check(2 * pp <= N, f"dualpipe needs at least 2*pp={2 * pp} micro-batches, got {N}")
    else:
        _check(pp % 2 == 0, f"dualpipev needs an even pp: pp counts stages, two per device, got {pp}")
        _check(pp <= N, f"dualpipev needs at least pp={pp} micro-batches (2 per device), got {N}")


def make_schedule(name: str, pp: int, num_microbatches: int) -> Schedule:
    """Build and validate a schedule. `pp` is the PP of the paper's table: ranks for 1f1b, zb1p and
    dualpipe; stages for dualpipev, which runs them on pp/2 devices."""
    check_requirements(name, pp, num_microbatches)
    builder: dict[str, Callable[[int, int], Schedule]] = {
        "1f1b": _one_f_one_b,
        "zb1p": _zb1p,
        "dualpipe": _dualpipe,
        "dualpipev": _dualpipev,
    }
    return builder[name](pp, num_microbatches).validate()


def _one_f_one_b(p: int, n: int) -> Schedule:
    """1F1B: rank r runs p-1-r warm-up forwards, then alternates F and a full B, then drains the Bs."""
    actions = []
    for r in range(p):
        warm = min(p - 1 - r, n)
        acts = [Action("F", m, r) for m in range(warm)]
        for j in range(n - warm):
            acts += [Action("F", warm + j, r), Action("B", j, r)]
        acts += [Action("B", j, r) for j in range(n - warm, n)]
        actions.append(tuple(acts))
    return _single_route("1f1b", p, n, actions)


def _zb1p(p: int, n: int) -> Schedule:
    """ZB1P (zero-bubble ZB-H1): 1F1B's order with every backward split into I and W. In the steady state
    rank r holds back r weight gradients; in the cool-down each gap while it waits for the next input
    gradient takes one W. Peak in-flight activations stay at p; the bubble drops to (p-1)(F+B-2W)."""
    actions = []
    for r in range(p):
        warm = min(p - 1 - r, n)
        acts = [Action("F", m, r) for m in range(warm)]
        pending: deque[int] = deque()
        for j in range(n):
            if j < n - warm:
                acts.append(Action("F", warm + j, r))
            acts.append(Action("I", j, r))
            pending.append(j)
            keep = r if j < n - warm else len(pending) - 1  # cool-down: one W per I
            while len(pending) > keep:
                acts.append(Action("W", pending.popleft(), r))
        acts += [Action("W", j, r) for j in pending]
        actions.append(tuple(acts))
    return _single_route("zb1p", p, n, actions)


def _single_route(name: str, p: int, n: int, actions: list[tuple[Action, ...]]) -> Schedule:
    return Schedule(name, p, p, p, n, (tuple(range(p)),), (0,) * n, tuple(actions))


# ---------------------------------------------------------------------- DualPipe / DualPipeV
def _dual_program(n: int, r: int, chunks: int) -> list[tuple]:
    """DeepSeek's DualPipe rank program over local phases (0: the chunk nearer this rank's entry point).

    n: ranks on one side of the fold (DualPipe: PP/2 half-ranks; DualPipeV: its PP/2 devices), r: this
    rank's index on that side, chunks: micro-batches per phase. Items: ("F", p), ("B", p), ("I", p), ("W",)
    (the oldest pending weight gradient) and ("FB", p_forward, p_backward). The step structure:
    1 nF0, 2 nF0F1, 3 nI1W1F1, 4 nF0B1F1B0 (main, overlapped pairs), 5 nB1F1B0, 6 nB1B0 (second half
    zero-bubble), 7 nWI0, 8 nW."""
    prog: list[tuple] = []
    prog += [("F", 0)] * (2 * (n - r - 1))
    for _ in range(r + 1):
        prog += [("F", 0), ("F", 1)]
    for _ in range(n - r - 1):
        prog += [("I", 1), ("W",), ("F", 1)]
    for i in range(chunks - 2 * n + r + 1):
        if i == 0 and r == n - 1:
            prog += [("F", 0), ("B", 1)]  # the fold: not overlapped, which shortens the bubble
        else:
            prog.append(("FB", 0, 1))
        prog.append(("FB", 1, 0))
    for _ in range(n - r - 1):
        prog += [("B", 1), ("FB", 1, 0)]
    zb = False
    for i in range(r + 1):
        if i == (r + 1) // 2 and r % 2 == 1:
            zb = True
        prog.append(("I" if zb else "B", 1))
        if i == (r + 1) // 2 and r % 2 == 0:
            zb = True
        prog.append(("I" if zb else "B", 0))
    for _ in range(n - r - 1):
        prog += [("W",), ("I" if zb else "B", 0)]
    prog += [("W",)] * (r + 1)
    return prog


def _bind(
    prog: list[tuple], stage_of: tuple[int, int], mb_of: Callable[[int, int], int]
) -> tuple[Action, ...]:
    """Turn a phase program into actions: per-phase counters number the micro-batches, Ws pop a FIFO of Is."""
    fwd = [0, 0]
    bwd = [0, 0]
    pending: deque[tuple[int, int]] = deque()
    out = []

    def f(p: int) -> tuple[int, int]:
        fwd[p] += 1
        return mb_of(p, fwd[p] - 1), stage_of[p]

    def b(p: int) -> tuple[int, int]:
        bwd[p] += 1
        return mb_of(p, bwd[p] - 1), stage_of[p]

    for item in prog:
        kind = item[0]
        if kind == "F":
            out.append(Action("F", *f(item[1])))
        elif kind in ("B", "I"):
            m, s = b(item[1])
            out.append(Action(kind, m, s))
            if kind == "I":
                pending.append((m, s))
        elif kind == "W":
            if not pending:
                raise ValueError("internal error: W with no pending input-gradient chunk")
            out.append(Action("W", *pending.popleft()))
        else:
            fm, fs = f(item[1])
            bm, bs = b(item[2])
            out.append(Action("FB", fm, fs, bm, bs))
    return tuple(out)


def _dualpipe(pp: int, n_mb: int) -> Schedule:
    half, chunks = pp // 2, n_mb // 2
    actions = []
    for rank in range(pp):
        second = rank >= half
        r = min(rank, pp - 1 - rank)
        # local phase p is global phase p ^ second: phase 0 = stage rank (route 0), phase 1 = stage pp-1-rank
        stage_of = (pp - 1 - rank, rank) if second else (rank, pp - 1 - rank)
        route_of = (1, 0) if second else (0, 1)
        actions.append(
            _bind(_dual_program(half, r, chunks), stage_of, lambda p, i, ro=route_of: ro[p] * chunks + i)
        )
    routes = (tuple(range(pp)), tuple(pp - 1 - s for s in range(pp)))
    mb_route = tuple(0 if m < chunks else 1 for m in range(n_mb))
    return Schedule("dualpipe", pp, pp, pp, n_mb, routes, mb_route, tuple(actions))


def _dualpipev(pp: int, n_mb: int) -> Schedule:
    devices = pp // 2
    actions = [
        _bind(_dual_program(devices, r, n_mb), (r, pp - 1 - r), lambda p, i: i) for r in range(devices)
    ]
    route = tuple(s if s < devices else pp - 1 - s for s in range(pp))
    return Schedule("dualpipev", pp, devices, pp, n_mb, (route,), (0,) * n_mb, tuple(actions))


def table_bubble(name: str, pp: int, F: float, B: float, W: float, FB: float) -> float:
    """The paper's Table 2 bubble for a schedule (DualPipe: the worst rank; DualPipeV: the same on pp/2
    devices)."""
    if name == "1f1b":
        return (pp - 1) * (F + B)
    if name == "zb1p":
        return (pp - 1) * (F + B - 2 * W)
    if name in ("dualpipe", "dualpipev"):
        return (pp / 2 - 1) * (FB + B - 3 * W)
    raise ValueError(f"unknown pipeline schedule {name!r}")


def table_activations(name: str, pp: int) -> int:
    """Peak in-flight activations per device from the paper's Table 2 (units: one micro-batch of a stage)."""
    return pp if name in ("1f1b", "zb1p") else pp + 1
