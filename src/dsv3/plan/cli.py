"""`dsv3 plan`: the analytic cost model from a preset or config, a parallel layout and a GPU kind.

    dsv3 plan --preset deepseek-v3-671b --pp 16 --ep 64 --gpus 2048 --schedule dualpipe \\
              --tokens 14.8T --hardware h800 --gpu-hours-per-trillion 180
    dsv3 plan pipeline ...        (pipeline schedule simulator: dsv3.parallel.pipeline.cli)
"""

from __future__ import annotations

import argparse
import json
import math
import re
from typing import Any

from dsv3.config import ModelConfig, preset_names
from dsv3.plan.activations import Savings
from dsv3.plan.hardware import GBPS, GIB, HARDWARE, get_hardware
from dsv3.plan.memory import SCHEDULES, Layout, Precision
from dsv3.plan.report import PlanInputs, Throughput, build_plan, format_table

SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_count(text: str) -> float:
    """'14.8T', '500B', '2e9', '1,000' -> a positive number."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    m = re.fullmatch(r"\s*([0-9][0-9_,]*\.?[0-9]*(?:e[+-]?[0-9]+)?)\s*([kmbgtp]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (examples: 14.8T, 500B, 2e9)")
    v = float(m.group(1).replace(",", "").replace("_", "")) * SUFFIX[m.group(2)]
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    g = parser.add_argument_group("model")
    g.add_argument(
        "--preset", choices=preset_names(), default=None, help="model preset (default deepseek-v3-671b)"
    )
    g.add_argument("--config", default=None, help="HF config.json, or a preset-style JSON with a 'model' key")
    g = parser.add_argument_group("layout")
    g.add_argument("--dp", type=int, default=None, help="data-parallel size (default: gpus / pp, else 1)")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel size (divides dp)")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages")
    g.add_argument(
        "--nodes", type=int, default=None, help="nodes one EP group spans (default ep / gpus per node)"
    )
    g.add_argument(
        "--node-limit", type=int, default=None, help="M of node-limited routing (default topk_group)"
    )
    g.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    g.add_argument("--micro-batches", type=int, default=None, help="micro-batches per step (default 2 * pp)")
    g.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch")
    g.add_argument("--seq-len", type=int, default=4096)
    g.add_argument("--no-zero1", action="store_true", help="replicate optimizer states instead of ZeRO-1")
    g = parser.add_argument_group("precision and memory savings")
    g.add_argument("--weights", choices=("bf16", "fp8"), default="bf16", help="training weight copy")
    g.add_argument("--grads", choices=("fp32", "bf16"), default="fp32")
    g.add_argument("--moments", choices=("bf16", "fp32"), default="bf16", help="AdamW moments")
    g.add_argument("--no-recompute-norm", action="store_true", help="store RMSNorm outputs")
    g.add_argument("--no-recompute-up-proj", action="store_true", help="store MLA up-projection outputs")
    g.add_argument("--no-fp8-activations", action="store_true", help="cache activations in BF16")
    g.add_argument("--no-mtp", action="store_true", help="leave the MTP modules out of training FLOPs")
    g = parser.add_argument_group("inference")
    g.add_argument(
        "--context", type=int, default=32768, help="context length for KV cache / max batch / decode"
    )
    g.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16")
    g.add_argument(
        "--serve-gpus", type=int, default=None, help="GPUs holding one model copy (default: fewest)"
    )
    g.add_argument("--serve-weights", choices=("fp8", "bf16"), default="fp8")
    g.add_argument("--reserve", type=float, default=0.1, help="fraction of GPU memory kept free when serving")
    g = parser.add_argument_group("hardware, time and cost")
    g.add_argument("--hardware", choices=sorted(HARDWARE), default="h800")
    g.add_argument("--gpu-mem-gib", type=float, default=None, help="override GPU memory")
    g.add_argument(
        "--nvlink-gbps", type=float, default=None, help="override NVLink GB/s per GPU per direction"
    )
    g.add_argument(
        "--ib-gbps", type=float, default=None, help="override InfiniBand GB/s per GPU per direction"
    )
    g.add_argument("--gpus-per-node", type=int, default=None)
    g.add_argument("--tokens", type=parse_count, default=None, help="training tokens, e.g. 14.8T")
    g.add_argument("--gpus", type=int, default=None, help="GPUs for the cost (default dp * pp)")
    tp = g.add_mutually_exclusive_group()
    tp.add_argument("--mfu", type=float, default=None, help="assumed model FLOPs utilisation (0-1]")
    tp.add_argument(
        "--tokens-per-gpu-s", type=float, default=None, help="measured throughput; prints implied MFU"
    )
    tp.add_argument("--gpu-hours-per-trillion", type=parse_count, default=None, help="e.g. 180000 or 180K")
    g.add_argument("--mfu-basis", choices=("bf16", "fp8"), default="bf16", help="peak the MFU is relative to")
    g.add_argument("--price", type=float, default=2.0, help="dollars per GPU hour")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")

    # `dsv3 plan pipeline ARGS...`: the schedule simulator lives in dsv3.parallel.pipeline.cli (above plan in
    # the layers); the top-level `dsv3` command attaches it as this subcommand (dsv3.cli).


def load_config(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    if args.config and args.preset:
        raise ValueError("give --preset or --config, not both")
    if args.config:
        try:
            with open(args.config) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read config {args.config}: {e}") from None
        if isinstance(d, dict) and isinstance(d.get("model"), dict):
            return ModelConfig.from_dict(d["model"]), args.config
        return ModelConfig.from_hf(d), args.config
    name = args.preset or "deepseek-v3-671b"
    return ModelConfig.from_preset(name), name


def _check_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")


def inputs_from_args(args: argparse.Namespace, config: ModelConfig) -> PlanInputs:
    """Validate the command line and turn it into PlanInputs (ValueError names the bad option)."""
    _check_positive(
        args,
        (
            "dp",
            "ep",
            "pp",
            "nodes",
            "node_limit",
            "micro_batches",
            "micro_batch_size",
            "seq_len",
            "context",
            "serve_gpus",
            "gpu_mem_gib",
            "nvlink_gbps",
            "ib_gbps",
            "gpus_per_node",
            "gpus",
            "mfu",
            "tokens_per_gpu_s",
            "gpu_hours_per_trillion",
        ),
    )
    if args.price < 0:
        raise ValueError(f"--price must be >= 0, got {args.price}")
    pp, dp = args.pp, args.dp
    if dp is None:
        if args.gpus is not None and args.gpus % pp:
            raise ValueError(f"--gpus {args.gpus} is not divisible by --pp {pp}")
        dp = args.gpus // pp if args.gpus is not None else args.ep
    elif args.gpus is not None and args.gpus != dp * pp:
        raise ValueError(f"--gpus {args.gpus} != dp {dp} x pp {pp}")
    hw = get_hardware(args.hardware).replace(
        memory_bytes=None if args.gpu_mem_gib is None else int(args.gpu_mem_gib * GIB),
        nvlink_bw=None if args.nvlink_gbps is None else args.nvlink_gbps * GBPS,
        ib_bw=None if args.ib_gbps is None else args.ib_gbps * GBPS,
        gpus_per_node=args.gpus_per_node,
    )
    return PlanInputs(
        layout=Layout(
            dp,
            args.ep,
            pp,
            args.schedule,
            args.micro_batches,
            args.micro_batch_size,
            args.seq_len,
            not args.no_zero1,
        ),
        precision=Precision(weights=args.weights, grads=args.grads, moments=args.moments),
        savings=Savings(
            not args.no_recompute_norm, not args.no_recompute_up_proj, not args.no_fp8_activations
        ),
        hardware=hw,
        nodes=args.nodes,
        node_limit=args.node_limit,
        context=args.context,
        kv_dtype=args.kv_dtype,
        serve_gpus=args.serve_gpus,
        serve_weights=args.serve_weights,
        reserve=args.reserve,
        include_mtp=not args.no_mtp,
        tokens=args.tokens,
        gpus=args.gpus,
        throughput=Throughput(args.mfu, args.tokens_per_gpu_s, args.gpu_hours_per_trillion),
        mfu_basis=args.mfu_basis,
        price=args.price,
    )


def run(args: argparse.Namespace) -> int:
    config, name = load_config(args)
    plan = build_plan(config, name, inputs_from_args(args, config))
    print(json.dumps(plan, indent=2, default=_json_default) if args.json else format_table(plan))
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
