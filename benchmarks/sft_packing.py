"""SFT throughput: samples packed with sample masking vs padded batches, and packed == one by one.

The same SFT samples (chat-formatted problems of `TASKS` with their reasoning: 2- to 12-digit additions
and countdown, so lengths vary from ~20 to ~200 tokens) train the same model two ways: packed rows of
`--seq-len` tokens (best-fit-decreasing, block-diagonal attention, positions restarting per sample:
`dsv3.train.sft_data.pack`) and TRL's
default, a batch of samples right-padded to its longest. Throughput is real (non-padding) tokens per
second of forward + backward under BF16 autocast with the trainer's CPU paths; the two alternate,
several repetitions, medians. Then the gradient of one packed row in FP32 against the sum of its
samples' gradients run one by one: the max absolute difference (and relative to the largest gradient).

    python benchmarks/sft_packing.py [--preset tiny] [--samples 256] [--seq-len 256] [--reps 5] [--threads 2]

Last line: JSON {ours: packed tokens/s, baseline: padded tokens/s, ratio, unit, max_grad_diff, ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from dsv3 import ModelConfig, Transformer, lm_loss
from dsv3.cpu import apply_cpu_training
from dsv3.tasks import get_task
from dsv3.tokenizer import Tokenizer
from dsv3.train.sft_data import SFTRecord, pack, stack_rows, tokenize_record

TASKS = ("add:digits=2", "add:digits=3", "add:digits=6", "add:digits=12", "countdown")


def samples_of(n: int, vocab: int):
    """n chat samples with reasoning from tasks of very different lengths, shuffled (seeded)."""
    records = [r for spec in TASKS for r in get_task(spec).sft_records(n // len(TASKS) + 1, reasoning=True)]
    records = [records[i] for i in np.random.default_rng(0).permutation(len(records))[:n]]
    texts = [m["content"] for r in records for m in r["messages"]]
    tok = Tokenizer.train(texts, vocab)
    return tok, [tokenize_record(tok, SFTRecord(f"gen:{i}", "messages", r)) for i, r in enumerate(records)]


def padded_batches(samples, batch: int, pad_id: int):
    """TRL's default collation: consecutive samples, right-padded to the batch's longest."""
    out = []
    for i in range(0, len(samples), batch):
        group = samples[i : i + batch]
        T = max(len(s.input_ids) for s in group)
        x = torch.full((len(group), T), pad_id)
        y = torch.full((len(group), T), -100)
        for b, s in enumerate(group):
            ids = torch.tensor(s.input_ids)
            m = torch.tensor(s.loss_mask)
            x[b, : len(ids)] = ids
            y[b, : len(ids) - 1] = torch.where(m[1:], ids[1:], -100)
        out.append((x, y, None, None))
    return out


def packed_batches(samples, seq_len: int, batch: int, pad_id: int):
    rows = stack_rows(pack(samples, seq_len, pad_id))
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in rows.items()}
    n = len(t["input_ids"])
    return [
        (
            t["input_ids"][i : i + batch],
            t["labels"][i : i + batch],
            t["positions"][i : i + batch],
            t["segment_ids"][i : i + batch],
        )
        for i in range(0, n, batch)
    ]


def run_epoch(model, batches) -> float:
    t = time.perf_counter()
    for x, y, pos, seg in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, positions=pos, segment_ids=seg, with_mtp=False)
            loss = lm_loss(out, y, 0.0).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def max_grad_diff(cfg: ModelConfig, samples, seq_len: int) -> tuple[float, float]:
    """FP32: one packed row's gradient (sum of token losses) vs its samples' gradients one by one."""
    torch.manual_seed(0)
    model = Transformer(cfg.replace(num_nextn_predict_layers=0))
    apply_cpu_training(model)
    row = pack(samples[:8], seq_len)[0]
    x, y, pos, seg = (
        torch.from_numpy(a)[None] for a in (row.input_ids, row.labels, row.positions, row.segment_ids)
    )
    n = int((y != -100).sum())
    (lm_loss(model(x, positions=pos, segment_ids=seg), y, 0.0).loss * n).backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    starts = np.flatnonzero(np.diff(np.concatenate([[-2], row.segment_ids])) != 0)
    for a, b in zip(starts, [*starts[1:], seq_len]):
        if row.segment_ids[a] < 0:
            continue
        xs, ys = x[:, a:b], y[:, a:b]
        k = int((ys != -100).sum())
        if k:
            (lm_loss(model(xs), ys, 0.0).loss * k).backward()
    pairs = [(g, p.grad) for g, p in zip(packed, model.parameters()) if p.grad is not None]
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    return diff, diff / max(float(b.abs().max()) for _, b in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="padded batch: samples; packed batch: rows")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_preset(args.preset)
    tok, samples = samples_of(args.samples, min(cfg.vocab_size, 1024))
    cfg = cfg.replace(vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    apply_cpu_training(model)
    pad = tok.pad_id or 0
    real = sum(len(s.input_ids) for s in samples)
    sides = {
        "packed": packed_batches(samples, args.seq_len, args.batch, pad),
        "padded": padded_batches(samples, args.batch, pad),
    }
    slots = {k: sum(b[0].numel() for b in v) for k, v in sides.items()}
    for v in sides.values():  # warm-up
        run_epoch(model, v[:2])
    times = {k: [] for k in sides}
    for _ in range(args.reps):
        for k, v in sides.items():
            times[k].append(run_epoch(model, v))
    tps = {k: real / statistics.median(v) for k, v in times.items()}
    diff, rel = max_grad_diff(cfg, samples, args.seq_len)
    result = {
        "benchmark": "sft_packing",
        "preset": args.preset,
        "samples": len(samples),
        "real_tokens": real,
        "token_slots": slots,
        "packed_fill": round(real / slots["packed"], 3),
        "padded_fill": round(real / slots["padded"], 3),
        "packed_s": [round(t, 3) for t in times["packed"]],
        "padded_s": [round(t, 3) for t in times["padded"]],
        "max_grad_diff": diff,
        "max_grad_diff_relative": rel,
        "ours": round(tps["packed"], 1),
        "baseline": round(tps["padded"], 1),
        "ratio": round(tps["packed"] / tps["padded"], 3),
        "unit": "real tokens/s (forward + backward)",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
