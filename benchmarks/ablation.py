"""A small ablation in the paper's spirit, at equal steps on the bundled corpus:

- load balancing: auxiliary-loss-free (bias update + the tiny sequence-wise loss, DeepSeek-V3) vs a
  classic auxiliary loss (no bias update, batch-wise loss with alpha 0.01) vs no balancing at all;
- multi-token prediction: the same aux-free run with vs without the MTP module (depth 1).

Reported per run: validation loss and bits per byte (whole validation split, main model only), MaxVio on
the validation set (each MoE layer's max load / mean load - 1 over all validation tokens, averaged over
the main model's MoE layers) and MaxVio per training batch averaged over the last 20% of steps.

    python benchmarks/ablation.py [--preset tiny] [--steps 300] [--out runs/ablation] [key=value ...]

Last line: JSON {ours: aux-free val loss, baseline: aux-loss val loss, ratio, unit, runs: {...}}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dsv3.train.balance import max_violation
from dsv3.train.cli import build_configs
from dsv3.train.distributed import make_trainer
from dsv3.train.evaluate import autocast_context
from dsv3.train.metrics import read_metrics
from dsv3.train.trainer import Trainer

RUNS = {
    "aux_free": [],
    "aux_loss": ["bias_update_speed=0", "balance_loss=aux", "balance_alpha=0.01"],
    "no_balance": ["bias_update_speed=0", "balance_loss=none"],
    "aux_free_no_mtp": ["model.num_nextn_predict_layers=0"],
}


@torch.no_grad()
def val_max_vio(trainer: Trainer) -> float:
    """MaxVio over the whole validation split, averaged over the main model's MoE layers."""
    model = trainer.model.eval()
    counts = None
    for i in range(0, len(trainer.data.val_windows), trainer.cfg.batch_size):
        w = torch.from_numpy(trainer.data.val_windows[i : i + trainer.cfg.batch_size])
        with autocast_context(trainer.dtype):
            stats = model(w[:, :-1], with_mtp=False).router_stats
        c = [s.counts for s in stats]
        counts = c if counts is None else [a + b for a, b in zip(counts, c)]
    model.train()
    return float(np.mean([max_violation(c) for c in counts]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.runs.split(","):
        if name not in RUNS:
            raise SystemExit(f"unknown run {name!r}; choose from {list(RUNS)}")
        extra = ["eval_every=0", "ckpt_every=0", "sample_tokens=0", *args.overrides, *RUNS[name]]
        model_cfg, train_cfg = build_configs(args.preset, extra, args.steps)
        run_dir = Path(args.out) / name
        t0 = time.perf_counter()
        trainer = make_trainer(model_cfg, train_cfg, run_dir, overwrite=True, progress=False)
        summary = trainer.fit()
        train = [r for r in read_metrics(run_dir) if r.get("type") == "train"]
        tail = train[-max(1, len(train) // 5) :]
        results[name] = {
            "val_loss": round(summary["val_loss"], 4),
            "val_bpb": round(summary["val_bpb"], 4),
            "max_vio_val": round(val_max_vio(trainer), 3),
            "max_vio_batch": round(float(np.mean([r["max_vio"] for r in tail])), 3),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(name, json.dumps(results[name]), flush=True)
    print("| run | val loss | val bpb | MaxVio (val) | MaxVio (batch, last 20%) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['val_loss']} | {r['val_bpb']} | {r['max_vio_val']} | {r['max_vio_batch']} |")
    ours = results.get("aux_free", {}).get("val_loss")
    base = results.get("aux_loss", {}).get("val_loss")
    out = {
        "benchmark": "ablation",
        "preset": args.preset,
        "steps": args.steps,
        "ours": ours,
        "baseline": base,
        "ratio": round(ours / base, 4) if ours and base else None,
        "unit": "val loss (nats/token), aux-free vs aux-loss",
        "runs": results,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
