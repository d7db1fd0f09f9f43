"""Expert-parallel dispatch on N CPU processes (gloo): communication volume, MoE step time, overlap.

Measured in one run of 4 local processes (2 simulated nodes of 2 EP ranks), one MoE layer in fp32:

1. bytes the dispatch sends per token, with and without node-limited routing (M=1 of 2 nodes): the rows
   our all-to-all really sends to other ranks (one row per (token, destination rank), counted from the
   splits it used), split into intra- and inter-node, for an FP32, BF16 and FP8 (E4M3 + 1x128 scales)
   payload; plus the inter-node rows a hierarchical dispatch (one copy per (token, remote node), then
   forwarded inside the node, as DeepSeek's) would send: the number the node limit bounds by M;
2. MoE layer step time (forward + backward) for a fixed global batch at EP=1 (one process, all experts),
   EP=2 and EP=4 (each rank its share of the tokens), alternating, medians over repetitions;
3. the fraction of the dispatch all-to-all hidden behind the shared expert: 1 - (time waited for the
   async dispatch after the shared expert) / (time of the same dispatch run synchronously).

ours = inter-node bytes per token with node-limited routing, baseline = without (BF16 payload, the
hierarchical count); the last line is JSON. On this 2-core CPU, 4 processes oversubscribe the cores,
so step times show correctness and overheads, not GPU-cluster speedups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from dsv3.config import ModelConfig
from dsv3.model import MoE
from dsv3.parallel import ExpertParallelMoE, ParallelConfig, route, run_local
from dsv3.parallel.comm import fp8_row_bytes
from dsv3.parallel.mesh import Mesh


def _config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_preset("debug").replace(
        hidden_size=args.dim,
        moe_intermediate_size=args.inter,
        n_routed_experts=args.experts,
        num_experts_per_tok=args.topk,
        n_group=args.nodes,
        topk_group=args.nodes,
        n_shared_experts=1,
    )


def _mesh(rank: int, ep: int, nodes: int, group, **kw) -> Mesh:
    pc = ParallelConfig(ep=ep, nodes=nodes, **kw)
    return Mesh(config=pc, rank=rank, ep_rank=rank % ep, ep_group=group, data_group=group)


def _volume(moe: MoE, x: torch.Tensor, rank: int, world: int, nodes: int, node_limit, group) -> dict:
    """Rows sent per token by our dispatch (from its splits) and by a node-deduplicated dispatch."""
    ep_moe = ExpertParallelMoE(moe, _mesh(rank, world, nodes, group, node_limit=node_limit))
    with torch.no_grad():
        ep_moe(x.unsqueeze(0))
        sent = ep_moe.last_load["sent_rows"].double()
        _, idx = route(moe.gate, moe.gate.scores(x), nodes, node_limit)
    per_node = world // nodes
    my_node = rank // per_node
    node_of_rank = torch.arange(world) // per_node
    intra = sent[(node_of_rank == my_node) & (torch.arange(world) != rank)].sum()
    inter = sent[node_of_rank != my_node].sum()
    dest_node = idx // (moe.n_routed_experts // nodes)
    used = torch.zeros(x.shape[0], nodes, dtype=torch.bool).scatter_(1, dest_node, True)
    remote = used.clone()
    remote[:, my_node] = False
    n_tok = float(x.shape[0])
    stats = torch.tensor(
        [intra, inter, remote.sum().double(), used.sum().double(), n_tok], dtype=torch.float64
    )
    dist.all_reduce(stats)
    mx = used.sum(-1).max().double().reshape(1)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    n = stats[4].item()
    return {
        "intra_rows": stats[0].item() / n,
        "inter_rows": stats[1].item() / n,
        "inter_rows_node_dedup": stats[2].item() / n,
        "nodes_per_token": stats[3].item() / n,
        "max_nodes_per_token": int(mx.item()),
    }


def _step_time(module: torch.nn.Module, x: torch.Tensor) -> float:
    xx = x.clone().requires_grad_()
    t = time.perf_counter()
    y, _ = module(xx.unsqueeze(0))
    y.float().pow(2).mean().backward()
    return time.perf_counter() - t


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = _config(args)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    world_group = dist.group.WORLD
    pair_group = dist.new_group([0, 1])
    N = args.tokens
    gen = torch.Generator().manual_seed(123)
    x_all = torch.randn(N, cfg.hidden_size, generator=gen)
    out: dict = {}
    # 1. volume
    local = x_all[rank * N // world : (rank + 1) * N // world]
    out["free"] = _volume(moe, local, rank, world, args.nodes, None, world_group)
    out["limited"] = _volume(moe, local, rank, world, args.nodes, 1, world_group)
    # 2. step time, EP = 1, 2, 4 alternating; ranks outside the EP group wait at a barrier
    modules = {
        1: ExpertParallelMoE(moe, _mesh(0, 1, 1, None)) if rank == 0 else None,
        2: ExpertParallelMoE(moe, _mesh(rank, 2, 1, pair_group)) if rank < 2 else None,
        4: ExpertParallelMoE(moe, _mesh(rank, 4, args.nodes, world_group)),
    }
    times: dict[int, list[float]] = {1: [], 2: [], 4: []}
    for rep in range(args.reps + 1):
        for ep, m in modules.items():
            dist.barrier()
            t = torch.zeros(1)
            if m is not None:
                xs = x_all[rank * N // ep : (rank + 1) * N // ep]
                t[0] = _step_time(m, xs)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if rep > 0:  # the first round warms up
                times[ep].append(t.item())
    out["step_s"] = {ep: statistics.median(v) for ep, v in times.items()}
    # 3. overlap: async dispatch behind the shared expert vs the same dispatch synchronous
    m_async = modules[4]
    m_sync = ExpertParallelMoE(moe, _mesh(rank, 4, args.nodes, world_group, overlap_shared=False))
    waits, syncs, shared = [], [], []
    xs = x_all[rank * N // 4 : (rank + 1) * N // 4].unsqueeze(0)
    for m in (m_async, m_sync):
        m.record_timings = True
    with torch.no_grad():
        for _rep in range(args.reps + 1):
            for m in (m_async, m_sync):
                dist.barrier()
                m(xs)
            if _rep == 0:
                continue
            waits.append(m_async.timings["dispatch_wait_s"])
            shared.append(m_async.timings["shared_s"])
            syncs.append(m_sync.timings["dispatch_issue_s"])
    t = torch.tensor([statistics.median(waits), statistics.median(syncs), statistics.median(shared)])
    dist.all_reduce(t)
    out["overlap"] = {"exposed_wait_s": t[0].item() / world, "sync_a2a_s": t[1].item() / world,
                      "shared_s": t[2].item() / world}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096, help="global batch (tokens) of the MoE layer")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.nproc != 4:
        raise SystemExit("this benchmark compares EP = 1, 2, 4: run it with --nproc 4")
    res = run_local(_worker, args.nproc, args=(args,), timeout_s=600, collective_timeout_s=300)[0]
    D = args.dim
    row = {"fp32": 4 * D, "bf16": 2 * D, "fp8": fp8_row_bytes(D)}
    meta = 8 * args.topk  # int32 local expert ids + fp32 gate weights per row
    for name in ("free", "limited"):
        v = res[name]
        rows = v["intra_rows"] + v["inter_rows"]
        print(
            f"dispatch ({name}): rows/token intra-node {v['intra_rows']:.3f}, "
            f"inter-node {v['inter_rows']:.3f} (node-deduplicated {v['inter_rows_node_dedup']:.3f}); "
            f"nodes/token {v['nodes_per_token']:.2f} "
            f"(max {v['max_nodes_per_token']}); bytes/token bf16 {rows * row['bf16']:.0f}, "
            f"fp8 {rows * row['fp8']:.0f}"
        )
    st = res["step_s"]
    print("MoE layer fwd+bwd, global batch", args.tokens, "tokens:",
          ", ".join(f"EP={ep} {1e3 * s:.1f} ms" for ep, s in st.items()))  # fmt: skip
    ov = res["overlap"]
    hidden = max(0.0, 1 - ov["exposed_wait_s"] / ov["sync_a2a_s"]) if ov["sync_a2a_s"] > 0 else 0.0
    print(
        f"dispatch a2a sync {1e3 * ov['sync_a2a_s']:.2f} ms, exposed after the shared expert "
        f"{1e3 * ov['exposed_wait_s']:.2f} ms (shared expert {1e3 * ov['shared_s']:.2f} ms): "
        f"hidden {hidden:.2f}"
    )
    ours = res["limited"]["inter_rows_node_dedup"] * row["bf16"]
    base = res["free"]["inter_rows_node_dedup"] * row["bf16"]
    out = {
        "ours": ours,
        "baseline": base,
        "ratio": ours / base if base else None,
        "unit": "inter-node dispatch bytes per token (bf16 payload, node-deduplicated), node_limit=1 vs none",
        "row_bytes": row,
        "metadata_bytes_per_row": meta,
        "rows_per_token": {k: res[k] for k in ("free", "limited")},
        "flat_inter_node_bytes_per_token_bf16": {
            k: res[k]["inter_rows"] * row["bf16"] for k in ("free", "limited")
        },
        "moe_step_ms": {f"ep{ep}": 1e3 * s for ep, s in st.items()},
        "a2a_hidden_fraction": hidden,
        "config": {
            k: getattr(args, k)
            for k in ("nproc", "nodes", "tokens", "dim", "inter", "experts", "topk", "reps")
        },
        "machine": "2-core CPU, gloo, fp32",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
