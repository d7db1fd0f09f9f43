"""TFLOP/s of dsv3's blockwise-scaled FP8 GEMM against torch's BF16 matmul on the same GPU (target >= 1.4x).

Shapes: the paper's m=4096, n=7168, k=16384 and m=4096, n=4096, k=7168 (Fprop: activations in 1x128
tiles, weights in 128x128 blocks), and a grouped expert GEMM (8 experts x 4096 tokens, n=4096, k=7168:
DeepSeek-V3's fused gate+up projection of one GPU's experts) against torch's BF16 grouped/batched
matmul. "ours" times the GEMM on pre-quantised operands (as the recipe's kernels run); `with_quant` adds
quantising the activation (1x128 tiles, the Triton quantiser) to each call. Both sides alternate, several
repetitions of `--iters` calls timed with CUDA events, medians. Without an FP8 GPU (sm_89+) and Triton it
prints why and a JSON line with nulls.

    python benchmarks/fp8_gemm.py [--reps 7] [--iters 20] [--backends triton,scaled_mm]

Last line: JSON {ours, baseline, ratio, unit, device, shapes: [...]} (ours/baseline: the first shape).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv3.fp8 import fp8_gpu_available, get_backend, quantize_blocks
from dsv3.fp8.backends import triton_available
from dsv3.fp8.grouped import padded_layout

UNIT = "TFLOP/s"


def time_ms(fn: Callable[[], object], iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def compare(fns: dict[str, Callable[[], object]], flops: float, reps: int, iters: int) -> dict[str, float]:
    """Median TFLOP/s of each callable, timed in alternation."""
    for fn in fns.values():  # warm up (and autotune)
        fn()
        time_ms(fn, 3)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            samples[k].append(flops / (time_ms(fn, iters) * 1e-3) / 1e12)
    return {k: statistics.median(v) for k, v in samples.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_dense(backends: dict, m: int, n: int, k: int, reps: int, iters: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    quant = backends["triton"]
    xq, xs = quant.quantize_rowwise(x)
    wq, ws = quantize_blocks(w)
    fns: dict[str, Callable[[], object]] = {"bf16": lambda: x @ w.t()}
    for name, be in backends.items():
        fns[name] = lambda be=be: be.gemm(xq, xs, wq, ws, b_block=True, out_dtype=torch.bfloat16)
        fns[f"{name}_with_quant"] = lambda be=be: be.gemm(
            *quant.quantize_rowwise(x), wq, ws, b_block=True, out_dtype=torch.bfloat16
        )
    errs = {name: rel_err(fns[name](), x @ w.t()) for name in backends}
    return {
        "shape": f"dense m={m} n={n} k={k}",
        **compare(fns, 2.0 * m * n * k, reps, iters),
        "rel_err_vs_bf16": errs,
    }


def bench_grouped(backend, experts: int, m: int, n: int, k: int, reps: int, iters: int) -> dict:
    counts = torch.full((experts,), m, device="cuda")
    offsets, _, rows = padded_layout(counts)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    xq, xs = backend.quantize_rowwise(x)
    wq, ws = quantize_blocks(w)
    wt = w.transpose(1, 2)
    offs = offsets[1:].to(torch.int32)
    fns: dict[str, Callable[[], object]] = {"bf16_bmm": lambda: torch.bmm(x.view(experts, m, k), wt)}
    if hasattr(F, "grouped_mm"):
        fns["bf16_grouped_mm"] = lambda: F.grouped_mm(x, wt, offs=offs)
    fns["triton"] = lambda: backend.grouped_gemm(xq, xs, wq, ws, offsets, out_dtype=torch.bfloat16)
    fns["triton_with_quant"] = lambda: backend.grouped_gemm(
        *backend.quantize_rowwise(x), wq, ws, offsets, out_dtype=torch.bfloat16
    )
    res = compare(fns, 2.0 * experts * m * n * k, reps, iters)
    res["bf16"] = max(v for key, v in res.items() if key.startswith("bf16"))
    ref = torch.bmm(x.view(experts, m, k), wt).reshape(rows, n)
    err = rel_err(fns["triton"](), ref)
    return {"shape": f"grouped E={experts} x m={m} n={n} k={k}", **res, "rel_err_vs_bf16": {"triton": err}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--backends", default="triton,scaled_mm")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and triton_available() and fp8_gpu_available()):
        why = "needs a CUDA GPU with FP8 tensor cores (sm_89+) and Triton"
        print(f"fp8_gemm: skipped: {why}")
        print(json.dumps({"ours": None, "baseline": None, "ratio": None, "unit": UNIT, "skipped": why}))
        return 0
    backends = {}
    for name in args.backends.split(","):
        try:
            backends[name] = get_backend(name, "cuda")
        except ValueError as e:
            print(f"backend {name}: unavailable ({e})")
    if "triton" not in backends:
        backends["triton"] = get_backend("triton", "cuda")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    rows = []
    for m, n, k in [(4096, 7168, 16384), (4096, 4096, 7168)]:
        try:
            rows.append(bench_dense(backends, m, n, k, args.reps, args.iters))
        except RuntimeError as e:  # e.g. cuBLAS without blockwise scaling: drop that backend, keep going
            bad = [b for b in backends if b != "triton"]
            if not bad:
                raise
            print(f"dropping {bad} after: {e}")
            for b in bad:
                backends.pop(b)
            rows.append(bench_dense(backends, m, n, k, args.reps, args.iters))
    rows.append(bench_grouped(backends["triton"], 8, 4096, 4096, 7168, args.reps, args.iters))
    for r in rows:
        fp8 = {key: v for key, v in r.items() if isinstance(v, float) and not key.startswith("bf16")}
        best = max((v, key) for key, v in fp8.items() if not key.endswith("with_quant"))
        r["best"], r["ratio"] = best[1], best[0] / r["bf16"]
        parts = ", ".join(f"{key} {v:.0f}" for key, v in r.items() if isinstance(v, float) and key != "ratio")
        print(f"{r['shape']}: {parts} {UNIT}; best FP8 / BF16 = {r['ratio']:.2f}x")
    head = rows[0]
    result = {
        "ours": head[head["best"]],
        "baseline": head["bf16"],
        "ratio": head["ratio"],
        "unit": UNIT,
        "min_ratio": min(r["ratio"] for r in rows),
        "device": device,
        "torch": torch.__version__,
        "target": 1.4,
        "shapes": rows,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
