"""Quality of `make run`: the tiny preset's validation bits per byte beside a byte bigram model.

Both on the bundled tinyshakespeare's last 10% (nanoGPT's split, so figures compare with its character
models: the anchor is nanoGPT's small character model after ~10 minutes on a laptop CPU, 2.22 bits per
byte; its bigram, 3.58). The bigram (add-0.01 smoothed byte bigram fit on the train split) is computed
here; the model's figure is read from RUN_DIR/summary.json, written by the trainer at the end of a run
(with --train this script runs `dsv3 train --preset tiny --out RUN_DIR --overwrite` first).

    python benchmarks/train_quality.py [--run-dir runs/tiny] [--train]

Last line: JSON {ours: val_bpb, baseline: bigram bpb, ratio, unit}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dsv3.train.data import bigram_bpb, load_corpus, split_train_val

NANOGPT_CHAR_10MIN_BPB = 2.22


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/tiny")
    ap.add_argument("--train", action="store_true", help="train the tiny preset first (as `make run`)")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    wall = None
    if args.train:
        from dsv3.cli import main as dsv3_main

        t0 = time.perf_counter()
        rc = dsv3_main(["train", "--preset", "tiny", "--out", str(run_dir), "--overwrite"])
        wall = time.perf_counter() - t0
        if rc:
            raise SystemExit(rc)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"no {summary_path}: run `make run` (or pass --train) first")
    summary = json.loads(summary_path.read_text())
    info = json.loads((run_dir / "train_config.json").read_text())
    data = None if info["data"].startswith("bundled:") else info["data"]
    train, val = split_train_val(load_corpus(data), info["train"]["val_frac"])
    bigram = bigram_bpb("".join(train), "".join(val))
    print(
        f"val bpb {summary['val_bpb']:.4f} after {summary['steps']} steps ({summary['tokens']:,} tokens); "
        f"byte bigram {bigram:.4f}; nanoGPT char model anchor {NANOGPT_CHAR_10MIN_BPB}"
    )
    out = {
        "benchmark": "train_quality",
        "run_dir": str(run_dir),
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "train_tokens_per_s": summary.get("train_tokens_per_s"),
        "run_wall_s": round(wall, 1) if wall else summary.get("wall_s"),
        "anchor_nanogpt_char_bpb": NANOGPT_CHAR_10MIN_BPB,
        "ours": round(summary["val_bpb"], 4),
        "baseline": round(bigram, 4),
        "ratio": round(summary["val_bpb"] / bigram, 4),
        "unit": "bits per byte (lower is better)",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
