"""Decode-sized products on CPU: `PackedGEMV` (weights as [P, in, out/P] slabs, one bmm) vs `F.linear`.

Decoding multiplies a few rows by each weight, so the weights come from DRAM: the script cycles through
enough copies of each weight (default 40) that none is in cache when it is read, as in a decode step
that streams the whole model once per token. Shapes are the tiny preset's head (2048 x 256) and its dense
MLP's fused w1/w3 (1536 x 256) and w2 (256 x 768), at 1 and 8 rows. The two alternate, medians reported.

    python benchmarks/packed_gemv.py [--threads 2] [--copies 40] [--reps 200]

Last line: JSON with ours / baseline (us per product, summed over the shapes at 1 row), ratio
(baseline / ours: the speedup) and the per-shape figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.cpu.decode import PackedGEMV

SHAPES = [(2048, 256), (1536, 256), (256, 768)]  # (out, in)


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--copies", type=int, default=40)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result: dict = {"unit": "us per product", "threads": args.threads, "shapes": {}}
    with torch.no_grad():
        for rows in (1, 8):
            for out_f, in_f in SHAPES:
                layers = [nn.Linear(in_f, out_f, bias=False) for _ in range(args.copies)]
                packs = [PackedGEMV() for _ in layers]
                x = torch.randn(rows, in_f)
                for p, m in zip(packs, layers):  # build the packed copies up front
                    torch.testing.assert_close(p(x, m), m(x), atol=1e-4, rtol=1e-4)
                it = iter(range(1 << 62))

                def ours(it=it, layers=layers, packs=packs, x=x):
                    i = next(it) % len(layers)
                    packs[i](x, layers[i])

                def base(it=it, layers=layers, x=x):
                    i = next(it) % len(layers)
                    F.linear(x, layers[i].weight)

                o, b = [], []
                for _ in range(5):  # alternate in blocks
                    o += timed(ours, args.reps // 5)
                    b += timed(base, args.reps // 5)
                key = f"{out_f}x{in_f}_rows{rows}"
                result["shapes"][key] = {
                    "ours": round(statistics.median(o), 1),
                    "baseline": round(statistics.median(b), 1),
                }
                print(f"{key}: packed {statistics.median(o):.1f} us, F.linear {statistics.median(b):.1f} us")
    ones = [v for k, v in result["shapes"].items() if k.endswith("rows1")]
    result["ours"] = round(sum(v["ours"] for v in ones), 1)
    result["baseline"] = round(sum(v["baseline"] for v in ones), 1)
    result["ratio"] = round(result["baseline"] / result["ours"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
