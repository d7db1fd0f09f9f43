"""RUN_DIR/metrics.jsonl: one JSON object per line.

Record types (field "type"):
- "train": step (1-based: optimizer steps done), loss (main next-token CE), mtp_loss, balance_loss,
  total_loss, lr, grad_norm, tokens_per_s, max_vio (MaxVio averaged over MoE layers), batch_size,
  tokens (seen so far), mtp_weight, gamma, expert_load (per MoE layer, tokens per expert this step);
- "eval": step, val_loss (nats per token), val_bpb (bits per UTF-8 byte), val_tokens, val_bytes;
- "skip": step, reason (a non-finite loss or gradient; the optimizer step was skipped);
- "run": start/stop/resume events.
Floats are written with full precision (repr), so equal losses compare bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf/nan: "inf", "nan"
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


class MetricsLog:
    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run redoes those steps), atomically."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a run dir is accepted too); a torn last line is ignored."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise ValueError(f"no metrics file at {p}")
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
