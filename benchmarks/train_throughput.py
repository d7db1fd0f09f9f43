"""Training-step throughput: dsv3 vs transformers' DeepseekV3ForCausalLM, same shape, same weights.

A full step = forward, loss, backward, gradient clipping, AdamW. dsv3's step is the trainer's (main loss +
MTP loss at weight 0.3 + sequence-wise balance loss, bias update after the step); the baseline is
transformers' model (its defaults: grouped_mm experts, sdpa attention; it has no MTP module) with
torch's foreach AdamW. The tiny preset, batch 8 x 256 tokens. Each side first tries its candidate
settings (BF16 autocast, FP32, BF16 autocast + torch.compile) and keeps its fastest; then the two
alternate, several repetitions of a few steps, and medians are compared. dsv3 is also timed without MTP
(`ours_no_mtp`: the same work as the baseline's step).

    python benchmarks/train_throughput.py [--reps 5] [--steps 3] [--threads 2] [--no-compile]

Last line: JSON {ours, baseline, ratio, unit, ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from dsv3 import ModelConfig, Transformer, lm_loss
from dsv3.checkpoint import save_pretrained
from dsv3.runtime import tune_malloc
from dsv3.train.balance import update_balance_bias
from dsv3.train.optim import AdamW, param_groups


def _ctx(mode: str):
    return (
        torch.autocast("cpu", dtype=torch.bfloat16) if mode.startswith("bf16") else contextlib.nullcontext()
    )


def ours_step_fn(model: Transformer, mode: str, mtp: bool) -> Callable[[torch.Tensor, torch.Tensor], float]:
    opt = AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    alpha = model.config.aux_loss_alpha

    def loss_fn(x, y):
        with _ctx(mode):
            out = model(x, with_mtp=mtp)
            losses = lm_loss(out, y, 0.3 if mtp else 0.0, alpha, "seq")
        return losses.loss, [s.counts for s in out.router_stats]

    fn = torch.compile(loss_fn) if mode.endswith("compile") else loss_fn

    def step(x, y):
        loss, counts = fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_balance_bias(model.moe_layers()[: len(counts)], counts, 1e-3)
        return float(loss)

    return step


def hf_step_fn(hf, mode: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    def loss_fn(x, y):
        with _ctx(mode):
            return hf(input_ids=x, labels=y).loss

    fn = torch.compile(loss_fn) if mode.endswith("compile") else loss_fn

    def step(x, y):
        loss = fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def timed(step, x, y, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step(x, y)
    return (time.perf_counter() - t) / n


def pick_fastest(
    make: Callable[[str], Callable], modes: list[str], x, y, rounds: int = 3
) -> tuple[str, Callable]:
    """Warm every candidate setting up (compiling where asked), then time them alternately; fastest median."""
    steps, times = {}, {}
    for mode in modes:
        try:
            step = make(mode)
            step(x, y)  # warm-up (and compilation)
            step(x, y)
        except Exception as e:  # a setting that does not run on this machine is simply not a candidate
            print(f"  {mode}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})", flush=True)
            continue
        steps[mode], times[mode] = step, []
    if not steps:
        raise RuntimeError("no setting ran")
    for _ in range(rounds):
        for mode, step in steps.items():
            times[mode].append(timed(step, x, y, 1))
    for mode, ts in times.items():
        print(f"  {mode}: {statistics.median(ts) * 1e3:.0f} ms/step", flush=True)
    best = min(times, key=lambda m: statistics.median(times[m]))
    return best, steps[best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="eager settings only (no torch.compile)")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc malloc's thresholds alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # process-wide, so both sides run with it (as under `dsv3 train`); see dsv3.runtime
    malloc_tuned = False if args.default_malloc else tune_malloc()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d, dtype=torch.float32)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    hf.train()
    ours_plain = Transformer(cfg)
    ours_plain.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():  # same weights: the main losses agree before training
        l_ours = float(lm_loss(ours(x, with_mtp=False), y, 0.0).main_loss)
        l_hf = float(hf(input_ids=x, labels=x).loss)
    modes = ["bf16", "fp32"] + ([] if args.no_compile else ["bf16+compile"])
    print("dsv3 settings:", flush=True)
    ours_mode, ours_step = pick_fastest(lambda m: ours_step_fn(ours, m, mtp=True), modes, x, y)
    print("dsv3 without MTP:", flush=True)
    _, ours_nomtp_step = pick_fastest(lambda m: ours_step_fn(ours_plain, m, mtp=False), [ours_mode], x, y)
    print("transformers settings:", flush=True)
    hf_mode, hf_step = pick_fastest(lambda m: hf_step_fn(hf, m), modes, x, y)
    t_ours, t_nomtp, t_hf = [], [], []
    for _ in range(args.reps):
        t_ours.append(timed(ours_step, x, y, args.steps))
        t_hf.append(timed(hf_step, x, y, args.steps))
        t_nomtp.append(timed(ours_nomtp_step, x, y, args.steps))
    tok = args.batch * args.seq
    ours_tps = tok / statistics.median(t_ours)
    hf_tps = tok / statistics.median(t_hf)
    nomtp_tps = tok / statistics.median(t_nomtp)
    result = {
        "benchmark": "train_throughput",
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "malloc_tuned": malloc_tuned,
        "ours_setting": ours_mode,
        "baseline_setting": hf_mode,
        "initial_loss_ours": round(l_ours, 5),
        "initial_loss_baseline": round(l_hf, 5),
        "ours_ms": [round(t * 1e3, 1) for t in t_ours],
        "baseline_ms": [round(t * 1e3, 1) for t in t_hf],
        "ours_no_mtp": round(nomtp_tps, 1),
        "ratio_no_mtp": round(nomtp_tps / hf_tps, 3),
        "ours": round(ours_tps, 1),
        "baseline": round(hf_tps, 1),
        "ratio": round(ours_tps / hf_tps, 3),
        "unit": "tokens/s",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
