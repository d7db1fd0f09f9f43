"""`dsv3 convert`: re-encode an HF checkpoint (bf16 <-> fp32, dequantise or quantise FP8 128x128 blocks)."""

from __future__ import annotations

import argparse

from dsv3.io import torch_dtype

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", required=True, help="HF model directory, or a run directory (uses RUN_DIR/model)"
    )
    parser.add_argument("--output", required=True, help="output HF model directory (written atomically)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help="dtype of non-FP8 tensors")
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="store attention/MLP/expert projections as FP8 E4M3 with 128x128 scales",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)"
    )


def run(args: argparse.Namespace) -> int:
    from dsv3.checkpoint.hf import convert_checkpoint

    dtype = torch_dtype(args.dtype)
    out = convert_checkpoint(
        args.input, args.output, dtype=dtype, fp8=args.fp8, max_shard_size=args.max_shard_size
    )
    print(f"wrote {out} ({args.dtype}{', fp8 blocks' if args.fp8 else ''})")
    return 0
