"""MTP speculative decoding vs plain greedy decoding, on a model trained by `make run`.

Prompts are cut from the run's validation text (the tail of its corpus, as the trainer splits it). For
each prompt, plain greedy decoding and speculative decoding (the MTP module drafts one token, the main
model verifies it in the same forward as the next one) run alternately, several repetitions, one request
at a time by default (batch 1: the latency case; DeepSeek-V3 reports about 1.8x tokens/s at 85-90%
acceptance), or `--batch B` requests decoded together.
Greedy speculation is lossless, so the two outputs must be identical; the script checks it.

    python benchmarks/speculative.py [--run runs/tiny] [--prompts 8] [--new-tokens 128] [--reps 3] [--batch 1]

Last line: JSON with ours (speculative tokens/s), baseline (plain tokens/s), ratio (the speedup),
acceptance (accepted / drafted, 0-1) and tokens_per_forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dsv3.inference import LLM, SamplingParams, SpecStats


def validation_text(run_dir: Path) -> str:
    from dsv3.train.data import load_corpus, split_train_val

    info = json.loads((run_dir / "train_config.json").read_text())
    data = info.get("data")
    path = None if not data or str(data).startswith("bundled:") else data
    _, val = split_train_val(load_corpus(path), info.get("train", {}).get("val_frac", 0.1))
    return "".join(val)


def prompts_from(llm: LLM, text: str, n: int, length: int) -> list[list[int]]:
    ids = llm.tokenizer.encode(text)
    if len(ids) < n * length:
        raise ValueError(f"the validation text has {len(ids)} tokens: too few for {n} prompts of {length}")
    stride = len(ids) // n
    bos = getattr(llm.tokenizer, "bos_id", None)
    head = [bos] if isinstance(bos, int) else []
    return [head + ids[i * stride : i * stride + length] for i in range(n)]


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams, speculative: bool):
    t = time.perf_counter()
    outs = llm.generate(prompts, params, speculative=speculative)
    return time.perf_counter() - t, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", default="runs/tiny", help="run directory (or HF model directory) with an MTP module"
    )
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1: latency)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / "train_config.json").is_file() or not (run / "model").is_dir():
        print(
            f"{run} is not a finished training run: train one first with `make run` "
            f"(dsv3 train --preset tiny --out {run})",
            file=sys.stderr,
        )
        return 1
    torch.set_num_threads(args.threads)
    if args.batch < 1 or args.prompts % args.batch:
        print(f"--prompts {args.prompts} must be a multiple of --batch {args.batch}", file=sys.stderr)
        return 2
    max_len = args.prompt_len + args.new_tokens + 8
    llm = LLM(run, dtype=args.dtype, max_batch_size=args.batch, max_seq_len=max_len)
    if len(llm.model.mtp) == 0:
        print(f"{run} has no MTP module: nothing to draft with", file=sys.stderr)
        return 1
    prompts = prompts_from(llm, validation_text(run), args.prompts, args.prompt_len)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    timed(llm, batches[0], params, False)  # warm-up
    timed(llm, batches[0], params, True)
    plain_t, spec_t, identical = [], [], []
    stats = SpecStats(per_position=[0])
    for rep in range(args.reps):
        tp = ts = 0.0
        for b in batches:
            dt_p, outs_p = timed(llm, b, params, False)
            dt_s, outs_s = timed(llm, b, params, True)
            tp, ts = tp + dt_p, ts + dt_s
            for out_p, out_s in zip(outs_p, outs_s, strict=True):
                identical.append(out_p.token_ids == out_s.token_ids)
                if rep == 0:
                    stats.add(out_s.spec)
        plain_t.append(tp)
        spec_t.append(ts)
        print(f"rep {rep}: plain {tp:.3f} s, speculative {ts:.3f} s")
    tokens = args.prompts * args.new_tokens
    base, ours = tokens / statistics.median(plain_t), tokens / statistics.median(spec_t)
    result = {
        "run": str(run),
        "unit": "tokens/s",
        "ours": round(ours, 1),
        "baseline": round(base, 1),
        "ratio": round(ours / base, 3),
        "acceptance": round(stats.acceptance, 4),
        "tokens_per_forward": round(stats.tokens_per_forward, 3),
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "identical_to_plain": sum(identical) / len(identical),
        "prompts": args.prompts,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "dtype": args.dtype,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
