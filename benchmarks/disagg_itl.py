"""Inter-token latency of running decodes while long prompts arrive: disaggregated vs colocated.

Workload (same for both, same process, alternating, --reps times): --streams requests with short prompts
decode --decode-tokens tokens each (greedy, EOS ignored); once they are all decoding, --long-count long
prompts (--long-prompt tokens, --long-tokens to generate) arrive --interval seconds apart.
Measured: the gaps between consecutive tokens of the decoding streams, as the caller of `step()` sees
them (in the disaggregated engine that includes the trip from the decode worker to the front end).

- baseline: the colocated `Engine` (one process, --colocated-threads torch threads, default 1). A step that
  admits a long prompt prefills it before decoding the running batch, so every running stream waits.
- ours: `DisaggEngine` with one prefill and one decode worker process (one thread each), so a prefill
  runs beside the decode batch instead of in front of it. On a 2-core CPU the two workers still share
  the cores (and the memory bandwidth) with each other and with the front end.

Model: the tiny preset with random weights in bf16 (no tokenizer: token-id prompts). Last line: JSON with
ours = disaggregated ITL p99, baseline = colocated ITL p99, ratio = ours / baseline (lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from dsv3.config import ModelConfig
from dsv3.inference import Engine, SamplingParams
from dsv3.inference.disagg import DisaggEngine
from dsv3.inference.llm import cast_model
from dsv3.model import Transformer


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def run_workload(engine, args: argparse.Namespace, gen: torch.Generator) -> dict:
    """Drive `engine` through the workload; returns ITLs of the decoding streams and counts."""
    V = engine.config.vocab_size
    stream = SamplingParams(max_new_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
    long = SamplingParams(max_new_tokens=args.long_tokens, temperature=0, ignore_eos=True)
    streams = [f"s{i}" for i in range(args.streams)]
    for rid in streams:
        engine.add_request(rid, torch.randint(8, V, (args.short_prompt,), generator=gen).tolist(), stream)
    last: dict[str, float] = {}
    itl: list[float] = []
    n_long, next_long, live = 0, None, set(streams)
    t0 = time.perf_counter()
    deadline = t0 + args.timeout
    while engine.has_unfinished():
        now = time.perf_counter()
        if now > deadline:
            raise RuntimeError(f"workload did not finish within {args.timeout} s")
        if next_long is None and len(last) == len(streams):  # every stream is decoding: long prompts start
            next_long = now
        if next_long is not None and now >= next_long and live and n_long < args.long_count:
            ids = torch.randint(8, V, (args.long_prompt,), generator=gen).tolist()
            engine.add_request(f"long{n_long}", ids, long)
            n_long += 1
            next_long += args.interval
        outs = engine.step()
        t = time.perf_counter()
        for o in outs:
            if o.request_id not in live:
                continue
            if o.finish_reason == "error":
                raise RuntimeError(f"{o.request_id} failed: {getattr(o.output, 'error', '')}")
            for _ in o.new_token_ids:
                if o.request_id in last:
                    itl.append(t - last[o.request_id])
                last[o.request_id] = t
            if o.finished:
                live.discard(o.request_id)
    return {
        "itl": itl,
        "long_prompts": n_long,
        "seconds": time.perf_counter() - t0,
        "stream_tokens": args.streams * args.decode_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--streams", type=int, default=8, help="requests decoding throughout")
    ap.add_argument("--short-prompt", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=160)
    ap.add_argument("--long-prompt", type=int, default=1024)
    ap.add_argument("--long-tokens", type=int, default=4)
    ap.add_argument("--long-count", type=int, default=4, help="long prompts per run (while streams decode)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between long-prompt arrivals")
    ap.add_argument(
        "--colocated-threads",
        type=int,
        default=1,
        help="torch threads of the colocated engine (2 threads on a 2-core CPU shared with other work can be "
        "many times slower than 1: OpenMP threads wait on each other)",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    model = Transformer(cfg).eval()
    if args.dtype == "bf16":
        cast_model(model, torch.bfloat16)
    max_seq = args.long_prompt + max(args.long_tokens, args.decode_tokens) + args.short_prompt + 1
    batch = args.streams + 16
    torch.set_num_threads(args.colocated_threads)
    colocated = Engine(model, None, max_batch_size=batch, max_seq_len=max_seq)
    disagg = DisaggEngine(model, None, max_batch_size=batch, max_seq_len=max_seq, worker_threads=1)
    engines = {"disaggregated": disagg, "colocated": colocated}
    results: dict[str, list[dict]] = {k: [] for k in engines}
    try:
        for rep in range(-1, args.reps):  # rep -1: warm-up, not counted
            for name, engine in engines.items():
                r = run_workload(engine, args, torch.Generator().manual_seed(rep + 1))
                if rep < 0:
                    continue
                results[name].append(r)
                print(
                    f"rep {rep} {name:>13}: ITL p50 {percentile(r['itl'], 50) * 1e3:7.1f} ms  "
                    f"p99 {percentile(r['itl'], 99) * 1e3:7.1f} ms  max {max(r['itl']) * 1e3:7.1f} ms  "
                    f"{r['long_prompts']} long prompts  {r['stream_tokens'] / r['seconds']:6.1f} tok/s",
                    flush=True,
                )
    finally:
        disagg.close()

    def med(name: str, f) -> float:
        return statistics.median(f(r) for r in results[name])

    ours = med("disaggregated", lambda r: percentile(r["itl"], 99))
    base = med("colocated", lambda r: percentile(r["itl"], 99))
    summary = {
        name: {
            "itl_p50_s": round(med(name, lambda r: percentile(r["itl"], 50)), 5),
            "itl_p99_s": round(med(name, lambda r: percentile(r["itl"], 99)), 5),
            "itl_max_s": round(med(name, lambda r: max(r["itl"])), 5),
            "stream_tokens_per_s": round(med(name, lambda r: r["stream_tokens"] / r["seconds"]), 2),
            "long_prompts": med(name, lambda r: r["long_prompts"]),
        }
        for name in engines
    }
    print(
        json.dumps(
            {
                "metric": "ITL p99 of decoding streams while long prompts arrive (lower is better)",
                "ours": round(ours, 5),
                "baseline": round(base, 5),
                "ratio": round(ours / base, 4),
                "unit": "s",
                **summary,
                "setup": {
                    "preset": args.preset,
                    "dtype": args.dtype,
                    "streams": args.streams,
                    "decode_tokens": args.decode_tokens,
                    "long_prompt": args.long_prompt,
                    "long_tokens": args.long_tokens,
                    "long_count": args.long_count,
                    "interval_s": args.interval,
                    "colocated_threads": args.colocated_threads,
                    "workers": "1 prefill + 1 decode, 1 thread each",
                    "cpus": os.cpu_count(),
                },
                "reps": args.reps,
            }
        )
    )


if __name__ == "__main__":
    main()
