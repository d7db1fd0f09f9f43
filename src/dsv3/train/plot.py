"""`dsv3 plot RUN_DIR`: loss curves and the expert-load heatmap of a run, as PNGs (matplotlib, Agg).

- loss.png: train loss (main and MTP) and validation loss against the step; validation bits per byte;
  the learning rate; MaxVio (load imbalance averaged over MoE layers).
- expert_load.png: MoE layer x expert, each expert's share of its layer's routed tokens relative to a
  perfectly even share (1.0 = balanced), summed over the last `--window` fraction of logged steps.
- rewards.png, for a GRPO run (records of type "grpo", `dsv3 grpo`): the reward of each reward function
  and the weighted total (mean over the step's completions, a band of +-1 std), the held-out greedy
  accuracy ("eval" records, `eval_every`), the fraction of groups with equal rewards (no learning signal),
  completion length (mean, max, truncated fraction), KL to the reference and clip fractions, and the
  policy entropy with the engine/training log-prob gap. A GRPO run gets no loss.png (its loss is not a
  cross-entropy).
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


def grpo_curves(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """The series rewards.png draws, by name: "reward", "reward_std", "rewards/NAME/mean|std" for each
    reward function, "eval_accuracy" (from "eval" records) and the GRPO step statistics. Empty series are
    left out; an empty dict means the records hold no GRPO steps."""
    steps = [r for r in records if r.get("type") == "grpo"]
    if not steps:
        return {}
    names = sorted({k for r in steps for k in r if k.startswith("rewards/")})
    keys = ["reward", "reward_std", *names, "frac_reward_zero_std", "completion_length_mean"]
    keys += ["completion_length_max", "truncated_frac", "kl", "clip_region", "clip_low", "clip_high"]
    keys += ["entropy", "logprob_gap_max", "loss", "grad_norm"]
    out = {k: _series(records, "grpo", k) for k in keys}
    out["eval_accuracy"] = _series(records, "eval", "eval_accuracy")
    return {k: v for k, v in out.items() if v[0]}


def _band(ax: Any, curves: dict[str, tuple[list[int], list[float]]], mean: str, std: str, label: str) -> None:
    xs, ys = curves[mean]
    ax.plot(xs, ys, label=label, lw=1.0)
    if std in curves and curves[std][0] == xs:
        m, s = np.asarray(ys), np.asarray(curves[std][1])
        ax.fill_between(xs, m - s, m + s, alpha=0.15)


def _plot_grpo(curves: dict[str, tuple[list[int], list[float]]], path: Path, plt: Any) -> Path:
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    ax = axes[0, 0]
    funcs = [
        k[len("rewards/") : -len("/mean")] for k in curves if k.startswith("rewards/") and k.endswith("/mean")
    ]
    for name in funcs:
        _band(ax, curves, f"rewards/{name}/mean", f"rewards/{name}/std", name)
    if len(funcs) != 1:  # one function: the total is the same curve
        _band(ax, curves, "reward", "reward_std", "total (weighted)")
    ax.set(xlabel="step", ylabel="reward", title="reward (mean, band: +-1 std over completions)")
    ax.legend()
    ax = axes[0, 1]
    if "eval_accuracy" in curves:
        ax.plot(*curves["eval_accuracy"], "o-", ms=3)
        ax.set_ylim(-0.02, 1.02)
    else:
        ax.text(0.5, 0.5, "no held-out evaluation logged\n(dsv3 grpo eval_every=N)", ha="center", va="center")
    ax.set(xlabel="step", ylabel="greedy pass@1", title="held-out accuracy")
    ax = axes[0, 2]
    ax.plot(*curves["frac_reward_zero_std"], lw=1.0)
    ax.set_ylim(-0.02, 1.02)
    ax.set(xlabel="step", ylabel="fraction of groups", title="groups with equal rewards (no signal)")
    ax = axes[1, 0]
    for key, label in (("completion_length_mean", "mean"), ("completion_length_max", "max")):
        if key in curves:
            ax.plot(*curves[key], label=label, lw=1.0)
    ax.set(xlabel="step", ylabel="tokens", title="completion length")
    ax.legend(loc="upper left")
    if "truncated_frac" in curves:
        tw = ax.twinx()
        tw.plot(*curves["truncated_frac"], color="gray", ls=":", lw=1.0)
        tw.set(ylabel="truncated fraction (dotted)", ylim=(-0.02, 1.02))
    ax = axes[1, 1]
    for key, label in (("clip_region", "clipped"), ("clip_low", "clip low"), ("clip_high", "clip high")):
        if key in curves:
            ax.plot(*curves[key], label=label, lw=1.0)
    ax.set(xlabel="step", ylabel="fraction of tokens", title="clip fractions and KL")
    ax.legend(loc="upper left")
    if "kl" in curves:
        tw = ax.twinx()
        tw.plot(*curves["kl"], color="black", lw=1.0)
        tw.set(ylabel="KL to the reference (black)")
    ax = axes[1, 2]
    if "entropy" in curves:
        ax.plot(*curves["entropy"], lw=1.0)
    ax.set(xlabel="step", ylabel="nats / token", title="policy entropy (log-prob gap dotted)")
    if "logprob_gap_max" in curves:
        tw = ax.twinx()
        tw.semilogy(*curves["logprob_gap_max"], color="gray", ls=":", lw=1.0)
        tw.set(ylabel="max |engine - training| log-prob")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, window: float = 0.1) -> list[Path]:
    """Write the run's PNGs into out_dir (default RUN_DIR/plots); their paths. A GRPO run gets
    rewards.png, a training run loss.png and, with MoE loads logged, expert_load.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    curves = grpo_curves(records)
    if curves:
        written.append(_plot_grpo(curves, out / "rewards.png", plt))
    if curves and not any(r.get("type") == "train" for r in records):
        return written

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
