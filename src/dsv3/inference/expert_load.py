"""Per-layer per-expert token counts over a sliding window of steps.

DeepSeek-V3 places redundant copies of its hottest experts from the load it *observed* recently
(REFERENCE.md, inference deployment: the placement is recomputed periodically). `ExpertLoadRecorder` keeps
that observation: each step (one forward of the engine, or one training step) adds a [L, E] matrix of
token counts, L = MoE layers in `Transformer.moe_layers()` order (main layers, then MTP blocks), and
`load()` is the sum over the last `window` steps. The history is a ring buffer [window, L, E], so
recording is O(L E) and an old step leaves the window exactly (no exponential decay, no float drift).

Counts are stored in float64: token counts are integers far below 2^53, so sums are exact, and a
fractional load (say, an average over data-parallel ranks) is accepted as well. Counting is local:
under data or expert parallelism every rank records its own tokens and `load()` is all-reduced (summed)
by the caller before `dsv3.inference.eplb.rebalance`, so every rank computes the same placement.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dsv3.model import ModelOutput, RouterStats

FORMAT = "dsv3-expert-load"
VERSION = 1


def router_counts(out: ModelOutput | Sequence[RouterStats], num_layers: int | None = None) -> torch.Tensor:
    """Token counts [L, E] (float64, CPU) from a ModelOutput (or its `router_stats` list).

    With num_layers, layers the output has no stats for are zero rows at the end (a forward that did not
    run the MTP blocks routed no tokens through them); more stats than num_layers is an error."""
    stats = out.router_stats if isinstance(out, ModelOutput) else out
    if not isinstance(stats, Sequence):
        raise ValueError(f"expected a ModelOutput or a list of RouterStats, got {type(out).__name__}")
    rows = []
    for i, s in enumerate(stats):
        counts = s.counts if isinstance(s, RouterStats) else None
        if counts is None or counts.dim() != 1:
            raise ValueError(f"router_stats[{i}] has no 1-D `counts` tensor")
        rows.append(counts.detach().to("cpu", torch.float64))
    if num_layers is None:
        num_layers = len(rows)
    if len(rows) > num_layers:
        raise ValueError(
            f"output has router stats for {len(rows)} MoE layers, more than num_layers={num_layers}"
        )
    if not rows:
        raise ValueError("output has no router stats (no MoE layers ran)")
    if len({r.numel() for r in rows}) != 1:
        raise ValueError("router stats disagree on the number of experts")
    counts = torch.zeros(num_layers, rows[0].numel(), dtype=torch.float64)
    counts[: len(rows)] = torch.stack(rows)
    return counts


class ExpertLoadRecorder:
    """Sliding-window sum of per-layer per-expert token counts.

    >>> rec = ExpertLoadRecorder(num_layers=2, num_experts=8, window=100)
    >>> rec.record(router_counts(model(ids)))   # each step
    >>> rec.load()                              # [2, 8] tokens per expert over the last <= 100 steps
    """

    def __init__(self, num_layers: int, num_experts: int, window: int = 1000):
        for name, v in (("num_layers", num_layers), ("num_experts", num_experts), ("window", window)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.window = window
        self.steps = 0  # steps recorded since creation (or the last reset)
        self._history = torch.zeros(window, num_layers, num_experts, dtype=torch.float64)

    @property
    def steps_in_window(self) -> int:
        return min(self.steps, self.window)

    def record(self, counts: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Add one step: counts [L, E], or a list of L tensors [E] (`[s.counts for s in router_stats]`)."""
        if not isinstance(counts, torch.Tensor):
            if not isinstance(counts, Sequence) or not counts:
                raise ValueError("counts must be a [L, E] tensor or a non-empty list of [E] tensors")
            counts = torch.stack([torch.as_tensor(c).detach().to("cpu", torch.float64) for c in counts])
        counts = counts.detach().to("cpu", torch.float64)
        if counts.shape != (self.num_layers, self.num_experts):
            raise ValueError(
                f"counts must have shape [{self.num_layers}, {self.num_experts}] (MoE layers, experts), "
                f"got {list(counts.shape)}"
            )
        if not torch.isfinite(counts).all() or (counts < 0).any():
            raise ValueError("counts must be finite and non-negative")
        self._history[self.steps % self.window] = counts
        self.steps += 1

    def load(self) -> torch.Tensor:
        """Token counts summed over the last `window` steps: [L, E] float64 (a copy)."""
        return self._history.sum(dim=0)

    def history(self) -> torch.Tensor:
        """The steps in the window, oldest first: [steps_in_window, L, E] float64 (a copy)."""
        n = self.steps_in_window
        start = (self.steps - n) % self.window
        idx = (torch.arange(n) + start) % self.window
        return self._history[idx]

    def reset(self) -> None:
        self.steps = 0
        self._history.zero_()

    # ------------------------------------------------------------------ JSON
    def to_dict(self, history: bool = True) -> dict[str, Any]:
        """A JSON-able summary; with history, also each step of the window (enough to resume recording)."""
        d: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "window": self.window,
            "steps": self.steps,
            "steps_in_window": self.steps_in_window,
            "load": self.load().tolist(),
        }
        if history:
            d["history"] = self.history().tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertLoadRecorder:
        """Inverse of to_dict. Without a history the stored load becomes one step of the new window."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} record (missing or wrong 'format' field)")
        if d.get("version") != VERSION:
            raise ValueError(f"unsupported {FORMAT} version {d.get('version')!r} (expected {VERSION})")
        try:
            rec = cls(int(d["num_layers"]), int(d["num_experts"]), int(d["window"]))
            steps = int(d["steps"])
            load = torch.tensor(d["load"], dtype=torch.float64)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed {FORMAT} record: {e}") from e
        if steps < 0 or load.shape != (rec.num_layers, rec.num_experts):
            raise ValueError(f"malformed {FORMAT} record: steps={steps}, load shape {list(load.shape)}")
        if "history" in d:
            hist = torch.tensor(d["history"], dtype=torch.float64).reshape(
                -1, rec.num_layers, rec.num_experts
            )
            if hist.shape[0] != min(steps, rec.window):
                raise ValueError(f"history has {hist.shape[0]} steps, expected {min(steps, rec.window)}")
            for step in hist:
                rec.record(step)
            rec.steps = steps
            # re-seat the ring so that the next record() evicts the oldest step, as in the original
            rec._history = torch.roll(rec._history, shifts=(steps - hist.shape[0]) % rec.window, dims=0)
            if not torch.allclose(rec.load(), load, rtol=1e-9, atol=1e-6):
                raise ValueError("record is inconsistent: 'load' is not the sum of 'history'")
        elif steps > 0:
            rec.record(load)
        return rec

    def to_json(self, path: str | os.PathLike, history: bool = True) -> None:
        """Write to_dict() to path atomically (temp file in the same directory, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(history=history), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ExpertLoadRecorder:
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d)
