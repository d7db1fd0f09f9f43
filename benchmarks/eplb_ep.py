"""Measured expert-parallel load imbalance on G CPU processes, with and without redundant experts (EPLB).

A trained dsv3 model (default: runs/tiny if `make run` made it, else runs/eplb_tiny) runs expert-parallel
inference (dsv3.inference.ep) on G gloo ranks, attention data parallel: every rank feeds its own windows of
the validation split of the text the model was trained on. Per MoE layer, each rank counts the
(token, expert) rows its physical expert slots actually computed; the imbalance of a layer is
max / mean over ranks of those rows (the straggler factor of its all-to-all), averaged over the layers.

1. calibration: the first half of the validation windows runs with the identity placement (expert e on
   rank e // (E / G)); an ExpertLoadRecorder records every forward's router counts; the load is summed
   over ranks and `rebalance` places E + G * redundant_per_rank physical slots (one extra slot per rank
   by default, as DeepSeek-V3's prefill deployment: 32 redundant experts on 32 GPUs);
2. measurement, on the *other* half (held out from the placement): chunks of windows, each run once with
   the identity placement (baseline) and once with the EPLB placement (ours), alternating which goes
   first; the placement is swapped at run time between runs (`set_placement`, all-to-all re-gather).
ours = median over chunks of the EPLB imbalance, baseline = the same without redundancy; lower is better.
Also printed: the imbalance `Placement.imbalance` predicts from the held-out load (it assumes each expert's
tokens split exactly evenly over its replicas), per-layer figures, and forward / swap times (noisy on a
shared CPU, for information only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from dsv3.parallel import run_local

ROOT = Path(__file__).resolve().parent.parent


def default_model() -> Path:
    for cand in (ROOT / "runs" / "tiny", ROOT / "runs" / "eplb_tiny"):
        if (cand / "model" / "config.json").is_file():
            return cand
    raise SystemExit(
        "no trained model: run `make run` (runs/tiny) or "
        "`dsv3 train --preset tiny --steps 200 --out runs/eplb_tiny`, or pass --model"
    )


def validation_windows(run_dir: Path, seq_len: int) -> torch.Tensor:
    """The run's validation split (its train_config's corpus and val_frac), as [n, seq_len] windows."""
    from dsv3.tokenizer import Tokenizer
    from dsv3.train.data import load_corpus, split_train_val, tokenize_documents

    cfg_path = run_dir / "train_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    data = cfg.get("data", "bundled:tinyshakespeare")
    val_frac = cfg.get("train", {}).get("val_frac", 0.1)
    docs = load_corpus(None if str(data).startswith("bundled:") else data)
    _, val = split_train_val(docs, val_frac)
    tokens = torch.from_numpy(tokenize_documents(Tokenizer.from_file(run_dir), val)).long()
    n = tokens.numel() // seq_len
    return tokens[: n * seq_len].view(n, seq_len)


def _rank_main(rank: int, world: int, model_path: str, calib: torch.Tensor, chunks: list, args: dict) -> dict:
    from dsv3.checkpoint import from_pretrained
    from dsv3.inference.ep import apply_ep_inference
    from dsv3.inference.eplb import identity_placement, rebalance
    from dsv3.inference.expert_load import ExpertLoadRecorder, router_counts

    model = from_pretrained(model_path).eval()
    ep = apply_ep_inference(model)
    L, E = ep.num_layers, ep.num_experts
    batch = args["batch"]

    def forward_share(windows: torch.Tensor, recorder: ExpertLoadRecorder | None = None) -> float:
        """This rank's windows (round robin) in batches; every rank runs the same number of forwards."""
        mine = windows[rank::world]
        torch.distributed.barrier()
        t = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, mine.shape[0], batch):
                out = model(mine[b : b + batch])  # main layers and the MTP block (cache None: MTP runs)
                if recorder is not None:
                    recorder.record(router_counts(out, L))
        ep.sync()  # a rank with fewer windows serves the others' last forwards here
        torch.distributed.barrier()
        return time.perf_counter() - t

    rec = ExpertLoadRecorder(L, E, window=100000)
    forward_share(calib, rec)
    load = ep.all_reduce(rec.load())
    R = E + world * args["redundant_per_rank"]
    groups = model.config.n_group or 1
    placements = {"identity": identity_placement(L, E, world), "eplb": rebalance(load, R, groups, 1, world)}
    ep.rank_load()  # reset the counters
    runs = []
    for c, chunk in enumerate(chunks):
        order = ["identity", "eplb"] if c % 2 == 0 else ["eplb", "identity"]
        for name in order:
            torch.distributed.barrier()
            t = time.perf_counter()
            ep.set_placement(placements[name])
            swap_s = time.perf_counter() - t
            ep.routed_counts()
            fwd_s = forward_share(chunk)
            rows = ep.rank_load()  # [L, G]
            routed = ep.all_reduce(ep.routed_counts())  # [L, E] logical load of this chunk
            runs.append({"chunk": c, "placement": name, "rows": rows, "routed": routed,
                         "forward_s": fwd_s, "swap_s": swap_s})  # fmt: skip
    return {"runs": runs, "calib_load": load, "placements": placements} if rank == 0 else {}


def imbalance(rows: torch.Tensor) -> torch.Tensor:
    """[L, G] rows per rank -> per-layer max / mean (layers without rows: nan)."""
    mean = rows.mean(-1)
    return torch.where(mean > 0, rows.amax(-1) / mean.clamp_min(1e-12), torch.full_like(mean, float("nan")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="run directory or HF model directory (default: see above)")
    ap.add_argument("--nproc", type=int, default=4, help="EP ranks (gloo processes)")
    ap.add_argument("--redundant-per-rank", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="windows per forward per rank")
    ap.add_argument("--chunks", type=int, default=5, help="measurement repetitions (held-out chunks)")
    args = ap.parse_args()
    run_dir = args.model or default_model()
    windows = validation_windows(run_dir, args.seq_len)
    half = windows.shape[0] // 2
    calib, held = windows[:half], windows[half:]
    per_chunk = held.shape[0] // args.chunks
    if per_chunk < args.nproc:
        raise SystemExit(
            f"{held.shape[0]} held-out windows are too few for {args.chunks} chunks x {args.nproc}"
        )
    chunks = [held[c * per_chunk : (c + 1) * per_chunk] for c in range(args.chunks)]
    print(
        f"model {run_dir}: {windows.shape[0]} validation windows of {args.seq_len} tokens; calibration "
        f"{calib.shape[0]}, {args.chunks} held-out chunks of {per_chunk}; {args.nproc} ranks",
        file=sys.stderr,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = {"batch": args.batch, "redundant_per_rank": args.redundant_per_rank}
    t0 = time.perf_counter()
    res = run_local(
        _rank_main, args.nproc, (str(run_dir), calib, chunks, cfg), timeout_s=3600, collective_timeout_s=600
    )[0]
    wall = time.perf_counter() - t0
    placements = res["placements"]
    by = {"identity": [], "eplb": []}
    predicted = {"identity": [], "eplb": []}
    layers = {"identity": [], "eplb": []}
    times = {"identity": [], "eplb": []}
    swaps = []
    for r in res["runs"]:
        per_layer = imbalance(r["rows"])
        used = ~per_layer.isnan()
        name = r["placement"]
        by[name].append(per_layer[used].mean().item())
        layers[name].append(per_layer)
        pred = placements[name].imbalance(r["routed"])
        predicted[name].append(pred[used].mean().item())
        times[name].append(r["forward_s"])
        swaps.append(r["swap_s"])
    R = placements["eplb"].num_replicas
    E = placements["eplb"].num_experts
    print(f"placement: {E} experts -> {R} physical slots ({R // args.nproc} per rank)", file=sys.stderr)
    print(f"replicas per expert (layer 0): {placements['eplb'].replica_count[0].tolist()}", file=sys.stderr)
    for name in ("identity", "eplb"):
        pl = torch.stack(layers[name]).nanmedian(0).values
        print(
            f"{name:9s} measured imbalance per chunk {[round(v, 3) for v in by[name]]}, median per layer "
            f"{[round(v, 3) for v in pl.tolist()]}; predicted {statistics.median(predicted[name]):.3f}; "
            f"forward {statistics.median(times[name]):.2f}s",
            file=sys.stderr,
        )
    calib_pred = placements["eplb"].imbalance(res["calib_load"]).nanmean().item()
    print(f"in-sample (calibration load) predicted EPLB imbalance {calib_pred:.3f}", file=sys.stderr)
    ours, base = statistics.median(by["eplb"]), statistics.median(by["identity"])
    print(
        json.dumps(
            {
                "benchmark": "eplb_ep",
                "machine": f"{os.cpu_count()}-core CPU, {args.nproc} gloo processes",
                "model": str(run_dir),
                "ours": round(ours, 4),
                "baseline": round(base, 4),
                "ratio": round(ours / base, 4),
                "unit": "max/mean over ranks of (token, expert) rows computed, mean over MoE layers",
                "predicted_ours": round(statistics.median(predicted["eplb"]), 4),
                "predicted_baseline": round(statistics.median(predicted["identity"]), 4),
                "physical_slots": R,
                "experts": E,
                "chunks": args.chunks,
                "forward_s_ours": round(statistics.median(times["eplb"]), 3),
                "forward_s_baseline": round(statistics.median(times["identity"]), 3),
                "swap_s_median": round(statistics.median(swaps), 4),
                "wall_s": round(wall, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
