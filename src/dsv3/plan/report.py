"""Assemble a whole plan (parameters, FLOPs, memory, KV cache, EP traffic, cost) and render it as a table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dsv3.config import ModelConfig
from dsv3.plan.activations import Savings
from dsv3.plan.comm import ep_comm
from dsv3.plan.cost import training_cost
from dsv3.plan.flops import decode_flops, forward_flops, prefill_flops
from dsv3.plan.hardware import GIB, Hardware, get_hardware
from dsv3.plan.kvcache import (
    kv_bytes_per_token,
    max_batch,
    min_serving_gpus,
    per_head_kv_bytes_per_token,
    serving_weight_bytes,
)
from dsv3.plan.memory import Layout, Precision, memory_per_gpu
from dsv3.plan.params import count_params


@dataclass(frozen=True)
class Throughput:
    """Exactly one of mfu / tokens_per_gpu_s / gpu_hours_per_trillion, or none (no cost section)."""

    mfu: float | None = None
    tokens_per_gpu_s: float | None = None
    gpu_hours_per_trillion: float | None = None

    @property
    def given(self) -> bool:
        return any(x is not None for x in (self.mfu, self.tokens_per_gpu_s, self.gpu_hours_per_trillion))


@dataclass(frozen=True)
class PlanInputs:
    layout: Layout = field(default_factory=Layout)
    precision: Precision = field(default_factory=Precision)
    savings: Savings = field(default_factory=Savings)
    hardware: Hardware | None = None  # default H800
    nodes: int | None = None  # nodes one EP group spans
    node_limit: int | None = None  # M for node-limited routing
    context: int = 32768  # inference context for the KV cache / max batch
    kv_dtype: str = "bf16"
    serve_gpus: int | None = None
    serve_weights: str = "fp8"
    reserve: float = 0.1
    include_mtp: bool = True  # MTP in training FLOPs
    tokens: float | None = None
    gpus: int | None = None  # for cost; default layout.gpus
    throughput: Throughput = field(default_factory=Throughput)
    mfu_basis: str = "bf16"
    price: float = 2.0


def build_plan(config: ModelConfig, name: str, inputs: PlanInputs) -> dict[str, Any]:
    """Every figure of the plan as a JSON-ready dict (flat headline keys plus one section per topic)."""
    hw = inputs.hardware if inputs.hardware is not None else get_hardware("h800")
    lay = inputs.layout.validate(config)
    pc = count_params(config)
    seq = lay.seq_len
    fwd = forward_flops(config, seq, inputs.include_mtp)
    train_flops = 3 * fwd.total
    plan: dict[str, Any] = {
        "model": name,
        "params_total": pc.total,
        "params_total_with_mtp": pc.total_with_mtp,
        "params_active": pc.active,
        "kv_bytes_per_token": kv_bytes_per_token(config, inputs.kv_dtype),
        "train_flops_per_token": train_flops,
        "params": pc.as_dict(),
    }
    plan["flops"] = {
        "seq_len": seq,
        "forward_per_token": {**asdict(fwd), "total": fwd.total},
        "train_per_token": train_flops,
        "prefill_per_token": prefill_flops(config, inputs.context) / inputs.context,
        "decode_step": decode_flops(config, inputs.context, absorbed=True),
        "decode_step_per_head_kv": decode_flops(config, inputs.context, absorbed=False),
        "context": inputs.context,
    }
    mem = memory_per_gpu(config, lay, inputs.precision, inputs.savings)
    peak = mem.peak
    plan["memory"] = {
        "layout": {**asdict(lay), "micro_batches": lay.m, "gpus": lay.gpus},
        "precision": asdict(inputs.precision),
        "savings": asdict(inputs.savings),
        "gpu_memory_bytes": hw.memory_bytes,
        "peak_rank": {**asdict(peak), "total": peak.total},
        "per_rank_total": [r.total for r in mem.ranks],
        "fits": peak.total <= hw.memory_bytes,
    }
    serve = inputs.serve_gpus or min_serving_gpus(
        config, hw.memory_bytes, hw.gpus_per_node, inputs.serve_weights, inputs.reserve
    )
    plan["inference"] = {
        "context": inputs.context,
        "kv_dtype": inputs.kv_dtype,
        "kv_bytes_per_token": kv_bytes_per_token(config, inputs.kv_dtype),
        "kv_bytes_per_token_per_head": per_head_kv_bytes_per_token(config, inputs.kv_dtype),
        "weights": inputs.serve_weights,
        "weight_bytes": serving_weight_bytes(config, inputs.serve_weights),
        "gpus": serve,
        "max_batch": max_batch(
            config,
            inputs.context,
            hw.memory_bytes,
            serve,
            inputs.serve_weights,
            inputs.kv_dtype,
            inputs.reserve,
        ),
    }
    cost = None
    if inputs.throughput.given:
        t = inputs.throughput
        gpus = inputs.gpus or lay.gpus
        cost = training_cost(
            inputs.tokens if inputs.tokens is not None else 1e12,
            gpus,
            train_flops,
            hw,
            mfu=t.mfu,
            tokens_per_gpu_s=t.tokens_per_gpu_s,
            gpu_hours_per_trillion=t.gpu_hours_per_trillion,
            precision=inputs.mfu_basis,
            price=inputs.price,
        ).as_dict()
        cost["gpu_hours_per_trillion"] = 1e12 / cost["tokens_per_gpu_s"] / 3600
        if inputs.tokens is None:  # throughput alone: MFU and rate, no totals
            for k in ("tokens", "gpu_hours", "days", "dollars"):
                cost[k] = None
    elif inputs.tokens is not None:
        raise ValueError("--tokens needs a throughput: --mfu, --tokens-per-gpu-s or --gpu-hours-per-trillion")
    plan["cost"] = cost
    plan["gpu_hours"] = cost["gpu_hours"] if cost else None
    plan["dollars"] = cost["dollars"] if cost else None
    plan["mfu"] = cost["mfu"] if cost else None
    plan["comm"] = None
    if config.is_moe and lay.ep > 1:
        eff = cost["mfu"] if cost and cost["mfu"] <= 1 else 1.0
        nl = inputs.node_limit
        if nl is None and (config.n_group or 1) > 1 and config.topk_method != "greedy":
            nl = config.topk_group
        plan["comm"] = ep_comm(config, hw, lay.ep, inputs.nodes, nl, seq, inputs.mfu_basis, eff).as_dict()
    plan["hardware"] = asdict(hw)
    return plan


# ------------------------------------------------------------------------------------------ formatting
def _n(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:,.3f}{unit}"
    return f"{x:,.0f}"


def _flop(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:,.3f} {unit}"
    return f"{x:,.0f} FLOP"


def _gib(x: float) -> str:
    return f"{x / GIB:,.2f} GiB" if x >= GIB else f"{x / 2**20:,.2f} MiB"


def _hours(x: float) -> str:
    return f"{x / 1e3:,.1f}K" if x >= 1e3 else f"{x:,.2f}"


def _money(x: float) -> str:
    return f"${x / 1e6:,.3f}M" if x >= 1e6 else f"${x:,.2f}"


def format_table(plan: dict[str, Any]) -> str:
    """A readable multi-section table of a plan from build_plan."""
    rows: list[tuple[str, str]] = []

    def section(title: str) -> None:
        rows.append(("", ""))
        rows.append((f"== {title}", ""))

    p = plan["params"]
    section(f"parameters ({plan['model']})")
    rows += [
        ("total (main model)", f"{p['total']:,} ({_n(p['total'])})"),
        ("total incl. MTP", f"{p['total_with_mtp']:,} ({_n(p['total_with_mtp'])})"),
        ("activated per token", f"{p['active']:,} ({_n(p['active'])})"),
        ("embedding / head", f"{_n(p['embedding'])} / {_n(p['head'])}"),
        ("attention (MLA)", _n(p["attention"])),
        ("dense MLP", _n(p["dense_mlp"])),
        (
            "MoE routed / shared / gate",
            f"{_n(p['moe_routed'])} / {_n(p['moe_shared'])} / {_n(p['moe_gate'])}",
        ),
        ("MTP modules", _n(p["mtp"])),
    ]
    f = plan["flops"]
    fw = f["forward_per_token"]
    section(f"FLOPs per token (seq {f['seq_len']}, causal)")
    rows += [
        (
            "forward: GEMM / head / attention / MTP",
            f"{_flop(fw['gemm'])} / {_flop(fw['head'])} / {_flop(fw['attention'])} / {_flop(fw['mtp'])}",
        ),
        ("training (fwd + bwd = 3x fwd)", _flop(f["train_per_token"])),
        (f"prefill at context {f['context']}", f"{_flop(f['prefill_per_token'])} per token"),
        (
            f"decode step at context {f['context']}",
            f"{_flop(f['decode_step'])} (absorbed MLA); "
            f"{_flop(f['decode_step_per_head_kv'])} with per-head K/V",
        ),
    ]
    m = plan["memory"]
    lay, pk = m["layout"], m["peak_rank"]
    section(
        f"training memory per GPU ({lay['gpus']} GPUs: dp {lay['dp']}, ep {lay['ep']}, pp {lay['pp']}, "
        f"{lay['schedule']}, {lay['micro_batches']} micro-batches of {lay['micro_batch_size']} x "
        f"{lay['seq_len']} tokens)"
    )
    sv = m["savings"]
    on = [k for k, v in sv.items() if v]
    rows += [
        (
            "peak pipeline rank",
            f"{pk['rank']} (stages {list(pk['stages'])}, in flight {list(pk['in_flight'])})",
        ),
        ("parameters held", _n(pk["params"])),
        (f"weights ({m['precision']['weights']})", _gib(pk["weights"])),
        (f"gradients ({m['precision']['grads']})", _gib(pk["grads"])),
        (
            f"master weights ({m['precision']['master']})" + (" ZeRO-1" if lay["zero1"] else ""),
            _gib(pk["master"]),
        ),
        (f"AdamW moments ({m['precision']['moments']})", _gib(pk["moments"])),
        ("activations (savings: " + (", ".join(on) or "none") + ")", _gib(pk["activations"])),
        (
            "total",
            f"{_gib(pk['total'])} of {_gib(m['gpu_memory_bytes'])}: "
            + ("fits" if m["fits"] else "does NOT fit"),
        ),
    ]
    inf = plan["inference"]
    section(f"inference (context {inf['context']}, KV {inf['kv_dtype']})")
    ratio = inf["kv_bytes_per_token_per_head"] / inf["kv_bytes_per_token"]
    rows += [
        ("KV cache per token (MLA latent)", f"{inf['kv_bytes_per_token']:,.0f} bytes"),
        ("per-head K/V would be", f"{inf['kv_bytes_per_token_per_head']:,.0f} bytes ({ratio:.1f}x)"),
        (f"weights ({inf['weights']})", _gib(inf["weight_bytes"])),
        (f"max batch on {inf['gpus']} GPUs", f"{inf['max_batch']:,} sequences"),
    ]
    c = plan["comm"]
    if c:
        lim = f"M={c['node_limit']}" if c["node_limit"] else "no node limit"
        section(f"EP all-to-all per token per MoE layer (ep {c['ep']} over {c['nodes']} node(s), {lim})")
        rows += [
            (
                "dispatch (FP8) / combine (BF16) per copy",
                f"{c['dispatch_bytes']:,.0f} / {c['combine_bytes']:,.0f} bytes",
            ),
            ("IB copies, node-limited / unlimited", f"{c['ib_copies']} / {c['ib_copies_unlimited']}"),
            ("IB bytes, node-limited / unlimited", f"{c['ib_bytes']:,.0f} / {c['ib_bytes_unlimited']:,.0f}"),
            ("NVLink bytes", f"{c['nvlink_bytes']:,.0f}"),
            ("experts per node free over NVLink", f"{c['experts_per_node_free']:.1f}"),
            (
                f"compute : comm (compute at {c['compute_efficiency']:.0%} of peak)",
                f"{_ratio(c['ratio'])} node-limited, {_ratio(c['ratio_unlimited'])} unlimited",
            ),
        ]
    cost = plan["cost"]
    if cost:
        section(f"time and cost ({cost['gpus']} x {cost['hardware']}, MFU vs {cost['precision']} peak)")
        rows += [
            ("throughput", f"{cost['tokens_per_gpu_s']:,.1f} tokens/s per GPU"),
            ("MFU", f"{cost['mfu']:.1%}"),
            ("GPU hours per trillion tokens", _hours(cost["gpu_hours_per_trillion"])),
        ]
        if cost["gpu_hours"] is not None:
            rows += [
                ("tokens", _n(cost["tokens"])),
                ("GPU hours", _hours(cost["gpu_hours"])),
                ("wall clock", f"{cost['days']:,.2f} days"),
                ("cost", f"{_money(cost['dollars'])} at ${cost['price_per_gpu_hour']:g} per GPU hour"),
            ]
        rows += [("warning", w) for w in cost["warnings"]]
    width = max(len(k) for k, _ in rows if not k.startswith("==")) + 2
    lines = [k if k.startswith("==") or not k else f"  {k.ljust(width)}{v}" for k, v in rows[1:]]
    return "\n".join(lines)


def _ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}"
