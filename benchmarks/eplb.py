"""Expert-parallel load imbalance (max / mean GPU load) with redundant experts vs plain expert parallelism.

Default shape: DeepSeek-V3's prefill unit (REFERENCE.md): 58 MoE layers of 256 experts in 8 groups, 4 nodes,
32 GPUs, 32 redundant experts (288 slots). Loads are synthetic and skewed (log-normal per expert, or Zipf
with random expert order per layer), or a JSON file written by `ExpertLoadRecorder.to_json`. The imbalance
is the expected one when each expert's tokens are spread evenly over its replicas (`Placement.gpu_load`).
ours = `rebalance` (EPLB); baseline = expert e on GPU e // (E / G) without redundancy; also reported:
`rebalance` without redundant slots (balanced packing only) and the time `rebalance` takes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dsv3.inference.eplb import identity_placement, rebalance
from dsv3.inference.expert_load import ExpertLoadRecorder


def synthetic_load(dist: str, layers: int, experts: int, skew: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dist == "lognormal":
        return (torch.randn(layers, experts, generator=gen, dtype=torch.float64) * skew).exp() * 1000
    zipf = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** skew
    return torch.stack([zipf[torch.randperm(experts, generator=gen)] for _ in range(layers)]) * 1e5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus", type=int, default=32)
    ap.add_argument("--redundant", type=int, default=32, help="extra physical expert slots per layer")
    ap.add_argument("--dist", choices=["lognormal", "zipf"], default="lognormal")
    ap.add_argument("--skew", type=float, default=1.0, help="log-normal sigma or Zipf exponent")
    ap.add_argument("--load-json", help="an ExpertLoadRecorder JSON file instead of synthetic loads")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    ours, base, packed, seconds = [], [], [], []
    for rep in range(args.reps):
        if args.load_json:
            load = ExpertLoadRecorder.from_json(args.load_json).load()
        else:
            load = synthetic_load(args.dist, args.layers, args.experts, args.skew, seed=rep)
        L, E = load.shape
        t = time.perf_counter()
        placement = rebalance(load, E + args.redundant, args.groups, args.nodes, args.gpus)
        seconds.append(time.perf_counter() - t)
        ours.append(placement.imbalance(load).mean().item())
        base.append(identity_placement(L, E, args.gpus).imbalance(load).mean().item())
        packed.append(rebalance(load, E, args.groups, args.nodes, args.gpus).imbalance(load).mean().item())
        print(
            f"rep {rep}: imbalance eplb {ours[-1]:.3f}  packing only {packed[-1]:.3f}  static {base[-1]:.3f}"
        )
    result = {
        "metric": "expert-parallel load imbalance, max/mean GPU load averaged over layers (lower is better)",
        "ours": round(statistics.median(ours), 4),
        "baseline": round(statistics.median(base), 4),
        "ratio": round(statistics.median(ours) / statistics.median(base), 4),
        "unit": "max/mean",
        "no_replica_packing": round(statistics.median(packed), 4),
        "rebalance_seconds": round(statistics.median(seconds), 4),
        "shape": {
            "layers": L,
            "experts": E,
            "slots": E + args.redundant,
            "groups": args.groups,
            "nodes": args.nodes,
            "gpus": args.gpus,
        },
        "load": args.load_json or f"{args.dist}(skew={args.skew})",
        "reps": args.reps,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
