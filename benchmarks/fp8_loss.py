"""FP8 vs BF16 training: relative loss error of the same run (the paper: below 0.25%), and activation memory.

Two trainers (dsv3.train.Trainer) with the same preset, seed, data order and initial weights; one runs its
GEMMs through dsv3.fp8 (convert_to_fp8: 1x128 / 128x128 E4M3 tiles, emulated on CPU), the other in BF16
autocast. Both keep FP32 master weights. Their steps alternate (so a busy machine slows both alike).
Reported: the relative difference of the final smoothed training loss (mean over the last `--window`
steps) and of the validation loss on the whole validation split; `rel_loss_error` is the larger.

`--pair bf16,fp32` runs the same comparison between two higher precisions: the noise floor of changing
the arithmetic at all (two runs diverge chaotically once any rounding differs), to read the FP8 figure
against.

Activation memory: on one batch, the bytes each model's autograd graph holds for backward (saved-tensor
hooks; storages counted once; parameters and autocast's BF16 weight copies excluded).

    python benchmarks/fp8_loss.py [--preset tiny] [--steps 300] [--pair bf16,fp8] [--png PATH] [key=value ...]

Last line: JSON {rel_loss_error, ours (FP8 val loss), baseline (BF16 val loss), ratio, unit, ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from dsv3.train.cli import build_configs
from dsv3.train.distributed import make_trainer, with_fp8
from dsv3.train.trainer import Trainer

MODES = {"bf16": ("bfloat16", False), "fp32": ("float32", False), "fp8": ("bfloat16", True)}  # dtype, fp8


def saved_activation_bytes(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """Bytes held for backward by one forward of the trainer's loss, by dtype (activations only)."""
    model = trainer.model
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        weight_copy = t.dtype == torch.bfloat16 and tuple(t.shape) in shapes  # autocast's cast of a weight
        if ptr not in params and ptr not in seen and not weight_copy:
            seen[ptr] = (str(t.dtype).replace("torch.", ""), st.nbytes())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = trainer.loss_step.eager(x, y, 0.3)[0].loss  # (under the trainer's autocast)
    by_dtype: dict[str, int] = {}
    for dtype, n in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    del out
    return {"total": sum(by_dtype.values()), **by_dtype}


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(
    curves: dict[str, list[float]], vals: dict[str, list[tuple[int, float]]], window: int, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axd) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 1])
    base, ours = curves
    colors = dict(zip(curves, ("tab:blue", "tab:red")))
    for name, c in curves.items():
        steps = range(1, len(c) + 1)
        ax.plot(steps, c, color=colors[name], alpha=0.25, lw=0.8)
        ax.plot(
            steps, smooth(c, window), color=colors[name], lw=1.8, label=f"{name} train (mean of {window})"
        )
        if vals[name]:
            vs, vl = zip(*vals[name])
            ax.plot(vs, vl, "o--", color=colors[name], ms=4, label=f"{name} val")
    ax.set_ylabel("loss (nats)")
    note = " (fp8: 1x128 / 128x128 E4M3 GEMMs, emulated on CPU)" if "fp8" in curves else ""
    ax.set_title(f"{ours} vs {base} training{note}")
    ax.legend()
    ax.grid(alpha=0.3)
    sb, sf = smooth(curves[base], window), smooth(curves[ours], window)
    axd.plot(range(1, len(sb) + 1), [100 * (f - b) / b for f, b in zip(sf, sb)], color="k", lw=1)
    axd.axhline(0, color="gray", lw=0.5)
    axd.axhspan(-0.25, 0.25, color="green", alpha=0.1, label="paper's 0.25%")
    axd.set_ylabel(f"({ours} - {base}) / {base}, %")
    axd.set_xlabel("step")
    axd.legend(loc="upper right")
    axd.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument(
        "--window", type=int, default=None, help="steps averaged for the final train loss (steps/10)"
    )
    ap.add_argument(
        "--evals", type=int, default=4, help="validation points on the curve (the last is the full split)"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--pair", default="bf16,fp8", help="baseline,ours among bf16, fp32, fp8 (fp8: bf16 + FP8 GEMMs)"
    )
    ap.add_argument("--png", default="benchmarks/out/fp8_loss.png")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg, train_cfg = build_configs(args.preset, args.overrides, args.steps)
    window = args.window or max(5, train_cfg.steps // 10)
    names = tuple(args.pair.split(","))
    if len(names) != 2 or names[0] == names[1] or not set(names) <= set(MODES):
        raise ValueError(f"--pair takes two different modes of {sorted(MODES)}, got {args.pair!r}")
    base, ours = names
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            n: make_trainer(
                model_cfg,
                with_fp8(dataclasses.replace(train_cfg, dtype=MODES[n][0]), MODES[n][1]),
                Path(tmp) / n,
                progress=False,
                overwrite=True,
            )
            for n in names
        }
        a, b = trainers[base], trainers[ours]
        same = all(
            torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values())
        )
        if not same:
            raise RuntimeError("the two runs do not start from the same weights")
        x, y = a.data.train.next_batch(train_cfg.batch_size, 0, 1)
        a.data.train.load_state_dict(b.data.train.state_dict())  # rewind: both runs then see the same batches
        mem = {n: saved_activation_bytes(t, x, y) for n, t in trainers.items()}
        curves: dict[str, list[float]] = {n: [] for n in names}
        vals: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
        secs = {n: 0.0 for n in names}
        eval_at = {round(train_cfg.steps * (i + 1) / args.evals) for i in range(args.evals)}
        t_start = time.perf_counter()
        for step in range(1, train_cfg.steps + 1):
            for n, t in trainers.items():
                t0 = time.perf_counter()
                rec = t.train_step()
                secs[n] += time.perf_counter() - t0
                if rec["type"] != "train":
                    raise RuntimeError(f"{n} step {step}: {rec}")
                curves[n].append(rec["loss"])
            if step in eval_at:
                full = step == train_cfg.steps
                for n, t in trainers.items():
                    r = t.evaluate(max_batches=None if full else train_cfg.eval_batches)
                    vals[n].append((step, r["val_loss"]))
                print(
                    f"step {step}: train {base} {smooth(curves[base], window)[-1]:.4f} "
                    f"{ours} {smooth(curves[ours], window)[-1]:.4f} | val {base} {vals[base][-1][1]:.4f} "
                    f"{ours} {vals[ours][-1][1]:.4f} | {time.perf_counter() - t_start:.0f}s",
                    flush=True,
                )
    train_final = {n: smooth(curves[n], window)[-1] for n in names}
    val_final = {n: vals[n][-1][1] for n in names}
    rel_train = abs(train_final[ours] - train_final[base]) / train_final[base]
    rel_val = abs(val_final[ours] - val_final[base]) / val_final[base]
    png = Path(args.png)
    plot(curves, vals, window, png)
    mb = {n: mem[n]["total"] / 2**20 for n in names}
    print(
        f"train loss (mean of last {window}): {base} {train_final[base]:.4f} {ours} {train_final[ours]:.4f}"
    )
    print(f"val loss (full split):       {base} {val_final[base]:.4f} {ours} {val_final[ours]:.4f}")
    print(f"relative error: train {100 * rel_train:.3f}%, val {100 * rel_val:.3f}% (paper: < 0.25%)")
    print(f"activations held for backward: {base} {mb[base]:.1f} MiB, {ours} {mb[ours]:.1f} MiB ({mem})")
    sps = {n: secs[n] / train_cfg.steps for n in names}
    print(f"seconds per step: {base} {sps[base]:.2f}, {ours} {sps[ours]:.2f} (fp8 is emulated on CPU)")
    print(f"curves: {png}")
    result = {
        "rel_loss_error": max(rel_train, rel_val),
        "rel_train_loss_error": rel_train,
        "rel_val_loss_error": rel_val,
        "ours": val_final[ours],
        "baseline": val_final[base],
        "ratio": val_final[ours] / val_final[base],
        "unit": f"val loss (nats), {ours} vs {base}",
        "pair": f"{base},{ours}",
        "train_loss": train_final,
        "val_loss": val_final,
        "activation_bytes": mem,
        "activation_ratio": mem[ours]["total"] / mem[base]["total"],
        "sec_per_step": sps,
        "preset": args.preset,
        "steps": train_cfg.steps,
        "tokens_per_step": train_cfg.batch_size * train_cfg.seq_len,
        "smooth_window": window,
        "png": str(png),
        "target": 0.0025,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
