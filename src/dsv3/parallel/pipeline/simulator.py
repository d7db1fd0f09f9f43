"""Execute a `Schedule` on paper: durations in, per-rank timeline, bubbles and memory out.

Every rank runs its actions in order; an action starts when its rank is free and every computation it
depends on has finished (zero communication time, as in the paper's analysis). An FB pair occupies its
rank for F&B and releases both halves' results at its end. The bubble of a rank is makespan - busy time
(the makespan is the whole step's, so ranks that finish early count their tail as bubble).

Activations: a (micro-batch, stage) activation is live from the start of its F until its weight gradient is
done (end of B, or of W after an I), since W still reads the saved inputs. Counting it from F's start and
freeing at the end of the backward gives 1F1B's p on rank 0 and DualPipe's PP+1, as in Table 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dsv3.parallel.pipeline.schedule import (
    Action,
    Schedule,
    action_dependencies,
    produces,
    table_activations,
    table_bubble,
    topological_order,
)


@dataclass(frozen=True)
class Durations:
    """Chunk times: F forward, B full backward, W its weight part (I = B - W), FB an overlapped F&B pair."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None  # default F + B: no gain from overlapping

    def __post_init__(self) -> None:
        for name in ("F", "B", "W"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v >= 0 and v == v):
                raise ValueError(f"duration {name} must be a number >= 0, got {v!r}")
        if self.F <= 0 or self.B <= 0:
            raise ValueError(f"durations F and B must be > 0, got F={self.F}, B={self.B}")
        if self.W > self.B:
            raise ValueError(
                f"W (the weight part of the backward) cannot exceed B, got W={self.W} > B={self.B}"
            )
        if self.FB is not None and not (self.FB > 0):
            raise ValueError(f"duration FB must be > 0, got {self.FB!r}")

    @property
    def fb(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def of(self, kind: str) -> float:
        return {"F": self.F, "B": self.B, "I": self.B - self.W, "W": self.W, "FB": self.fb}[kind]


@dataclass
class Interval:
    rank: int
    action: Action
    start: float
    end: float


@dataclass
class SimResult:
    schedule: Schedule
    durations: Durations
    timeline: list[list[Interval]]
    makespan: float
    busy: list[float]
    bubble: list[float]
    activations: list[int]
    params: list[float] = field(default_factory=list)

    @property
    def table_bubble(self) -> float:
        d = self.durations
        return table_bubble(self.schedule.name, self.schedule.pp, d.F, d.B, d.W, d.fb)

    def to_dict(self) -> dict[str, Any]:
        s, d = self.schedule, self.durations
        return {
            "schedule": s.name,
            "pp": s.pp,
            "devices": s.num_ranks,
            "stages": s.num_stages,
            "microbatches": s.num_microbatches,
            "durations": {"F": d.F, "B": d.B, "W": d.W, "FB": d.fb},
            "makespan": self.makespan,
            "busy": self.busy,
            "bubble": self.bubble,
            "max_bubble": max(self.bubble),
            "table_bubble": self.table_bubble,
            "activations": self.activations,
            "table_activations": table_activations(s.name, s.pp),
            "params": self.params,
            "timeline": [[[str(iv.action), iv.start, iv.end] for iv in row] for row in self.timeline],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def simulate(schedule: Schedule, durations: Durations | None = None) -> SimResult:
    """Run the schedule with the given chunk durations (zero communication time)."""
    d = durations or Durations()
    finish: dict[tuple[str, int, int], float] = {}
    free = [0.0] * schedule.num_ranks
    timeline: list[list[Interval]] = [[] for _ in range(schedule.num_ranks)]
    for rank, idx in topological_order(schedule):
        a = schedule.actions[rank][idx]
        start = max([free[rank]] + [finish[e] for e in action_dependencies(schedule, a)])
        end = start + d.of(a.kind)
        free[rank] = end
        for p in a.parts():
            for e in produces(p):
                finish[e] = end
        timeline[rank].append(Interval(rank, a, start, end))
    makespan = max(free)
    busy = [sum(iv.end - iv.start for iv in row) for row in timeline]
    per_stage = schedule.pp / schedule.num_stages  # parameters per stage in units of model/PP
    return SimResult(
        schedule=schedule,
        durations=d,
        timeline=timeline,
        makespan=makespan,
        busy=busy,
        bubble=[makespan - b for b in busy],
        activations=[peak_activations(schedule.actions[r]) for r in range(schedule.num_ranks)],
        params=[len(schedule.stages_of(r)) * per_stage for r in range(schedule.num_ranks)],
    )


def peak_activations(actions: tuple[Action, ...]) -> int:
    """Peak number of (micro-batch, stage) activations alive on a rank (see the module docstring)."""
    live = peak = 0
    for a in actions:
        for p in a.parts():
            if p.kind == "F":
                live += 1
                peak = max(peak, live)
        for p in a.parts():
            if p.kind in ("B", "W"):
                live -= 1
    return peak


# ---------------------------------------------------------------------- picture
COLORS = {"F": "#f6c667", "B": "#7fb3e6", "I": "#a9d18e", "W": "#c9a0dc"}


def plot_timeline(result: SimResult, path: str, title: str | None = None) -> None:
    """Draw the timeline as in the paper's Figure 5 (one row per device, a cell per chunk) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    s = result.schedule
    fig_w = min(40.0, 2.0 + result.makespan * 0.35)
    fig, ax = plt.subplots(figsize=(fig_w, 0.55 * s.num_ranks + 1.6))
    second_route = {m for m in range(s.num_microbatches) if s.mb_route[m] == 1}
    for row in result.timeline:
        for iv in row:
            y = s.num_ranks - 1 - iv.rank
            parts = iv.action.parts()
            width = (iv.end - iv.start) / len(parts)
            for k, p in enumerate(parts):
                x = iv.start + k * width
                ax.add_patch(
                    Rectangle(
                        (x, y),
                        width,
                        0.9,
                        facecolor=COLORS[p.kind],
                        edgecolor="black" if iv.action.kind == "FB" else "white",
                        linewidth=1.2 if iv.action.kind == "FB" else 0.5,
                        hatch="//" if p.mb in second_route else None,
                    )
                )
                label = str(p.mb if p.mb not in second_route else p.mb - s.num_microbatches // 2)
                ax.text(x + width / 2, y + 0.45, label, ha="center", va="center", fontsize=7)
    ax.set_xlim(0, result.makespan)
    ax.set_ylim(0, s.num_ranks)
    ax.set_yticks([s.num_ranks - 1 - r + 0.45 for r in range(s.num_ranks)])
    ax.set_yticklabels([f"device {r}" for r in range(s.num_ranks)])
    ax.set_xlabel("time")
    legend = [Patch(facecolor=c, label=k) for k, c in COLORS.items()]
    if second_route:
        legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="reverse direction"))
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(legend), fontsize=8)
    d = result.durations
    ax.set_title(
        title
        or f"{s.name}: pp={s.pp}, {s.num_microbatches} micro-batches, F={d.F} B={d.B} W={d.W} F&B={d.fb}; "
        f"bubble max {max(result.bubble):g} (table {result.table_bubble:g})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
