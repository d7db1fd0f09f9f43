"""`dsv3 plot RUN_DIR`: loss curves and the expert-load heatmap of a run, as PNGs (matplotlib, Agg).

- loss.png: train loss (main and MTP) and validation loss against the step; validation bits per byte;
  the learning rate; MaxVio (load imbalance averaged over MoE layers).
- expert_load.png: MoE layer x expert, each expert's share of its layer's routed tokens relative to a
  perfectly even share (1.0 = balanced), summed over the last `--window` fraction of logged steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from dsv3.train.metrics import read_metrics


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("type") == kind and isinstance(r.get(key), int | float):
            xs.append(r["step"])
            ys.append(float(r[key]))
    return xs, ys


def expert_load_matrix(records: list[dict[str, Any]], window: float = 0.1) -> np.ndarray:
    """[layers, experts] load relative to the mean over the last `window` of train records."""
    train = [r for r in records if r.get("type") == "train" and r.get("expert_load")]
    if not train:
        raise ValueError("no expert loads in the metrics (a dense model, or no train steps logged)")
    n = max(1, int(round(len(train) * window)))
    load = np.sum([np.asarray(r["expert_load"], dtype=np.float64) for r in train[-n:]], axis=0)
    mean = load.mean(axis=1, keepdims=True)
    return np.divide(load, mean, out=np.zeros_like(load), where=mean > 0)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, window: float = 0.1) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    for key, label in (("loss", "train"), ("mtp_loss", "train MTP")):
        ax.plot(*_series(records, "train", key), label=label, lw=0.8)
    ax.plot(*_series(records, "eval", "val_loss"), "o-", label="validation", ms=3)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(*_series(records, "eval", "val_bpb"), "o-", ms=3)
    ax.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    ax = axes[1, 0]
    ax.plot(*_series(records, "train", "lr"))
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax = axes[1, 1]
    ax.plot(*_series(records, "train", "max_vio"), lw=0.8)
    ax.set(xlabel="step", ylabel="MaxVio", title="load imbalance (mean over MoE layers)")
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    try:
        m = expert_load_matrix(records, window)
    except ValueError:
        return written
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * m.shape[1] + 2), max(2.5, 0.5 * m.shape[0] + 1.5)))
    im = ax.imshow(m, aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", ylabel="MoE layer (MTP last)", title="expert load / mean load (end of run)")
    ax.set_yticks(range(m.shape[0]))
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    written.append(out / "expert_load.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory with metrics.jsonl")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR/plots)")
    parser.add_argument(
        "--window", type=float, default=0.1, help="fraction of the last steps for the heatmap"
    )


def run(args: argparse.Namespace) -> int:
    if not 0 < args.window <= 1:
        raise ValueError(f"--window must be in (0, 1], got {args.window}")
    for p in plot_run(args.run_dir, args.out, args.window):
        print(p)
    return 0
