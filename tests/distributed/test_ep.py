"""Expert parallelism over gloo: EP forward/backward equal the single-process model (fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.model import MoE, Transformer, lm_loss
from dsv3.parallel import ExpertParallelMoE, ParallelConfig, build_mesh, parallelize, route, run_local
from dsv3.parallel.mesh import Mesh


def _moe_config() -> ModelConfig:
    # 8 experts in 4 groups (2 kept), top-2, one shared expert
    return ModelConfig.from_preset("debug")


def _init(module: torch.nn.Module, std: float = 0.2) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


def _with(mesh: Mesh, **kw) -> Mesh:
    return dataclasses.replace(mesh, config=dataclasses.replace(mesh.config, **kw))


def _moe_case(mesh: Mesh, rank: int, world: int, bias: torch.Tensor | None, fp8: bool = False) -> dict:
    """One MoE layer, uneven local batches (rank r has r + 1 sequences): EP vs the single-process MoE."""
    torch.manual_seed(1)
    cfg = _moe_config()
    moe = MoE(cfg)
    _init(moe)
    if bias is not None:
        moe.gate.e_score_correction_bias.copy_(bias)
    sizes = [r + 1 for r in range(world)]
    x = torch.randn(sum(sizes), 5, cfg.hidden_size)
    lo = sum(sizes[:rank])
    pc = mesh.config
    # reference: the single-device MoE, or the same routing function when node-limited
    ref = MoE(cfg)
    ref.load_state_dict(moe.state_dict())
    xr = x.clone().requires_grad_()
    xf = xr.reshape(-1, cfg.hidden_size)
    if pc.node_limit is None and not fp8:
        yr, _ = ref(xr)
    else:
        w, i = route(ref.gate, ref.gate.scores(xf), pc.nodes, pc.node_limit)
        xin = xf
        if fp8:
            from dsv3.parallel.comm import dequantize_rows_fp8, quantize_rows_fp8

            xin = xf + (dequantize_rows_fp8(quantize_rows_fp8(xf), xf.shape[1], xf.dtype) - xf).detach()
        yr = (ref.experts(xin, w, i) + ref.shared_experts(xf)).view_as(xr)
    (yr.pow(2).sum() + yr.sum()).backward()
    ep = ExpertParallelMoE(moe, mesh)
    xl = x[lo : lo + sizes[rank]].clone().requires_grad_()
    y, stats = ep(xl)
    (y.pow(2).sum() + y.sum()).backward()
    e0, e1 = ep.expert_range
    gate_grad = ep.gate.weight.grad.clone()
    shared_grad = ep.shared_experts.w2.weight.grad.clone()
    torch.distributed.all_reduce(gate_grad, group=mesh.ep_group)
    torch.distributed.all_reduce(shared_grad, group=mesh.ep_group)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()  # noqa: E731
    return {
        "y": rel(y, yr[lo : lo + sizes[rank]]),
        "dx": rel(xl.grad, xr.grad[lo : lo + sizes[rank]]),
        "experts": max(
            rel(getattr(ep.experts, n).grad, getattr(ref.experts, n).grad[e0:e1]) for n in ("w1", "w2", "w3")
        ),
        "gate": rel(gate_grad, ref.gate.weight.grad),
        "shared": rel(shared_grad, ref.shared_experts.w2.weight.grad),
        "recv_rows": int(ep.last_load["recv_rows"].sum()),
        "counts_ok": bool(
            torch.equal(
                stats.counts,
                torch.bincount(
                    route(
                        ref.gate,
                        ref.gate.scores(xl.detach().reshape(-1, cfg.hidden_size)),
                        pc.nodes,
                        pc.node_limit,
                    )[1].reshape(-1),
                    minlength=cfg.n_routed_experts,
                ).float(),
            )
        ),
    }


def _model_case(mesh: Mesh, rank: int, world: int) -> dict:
    """The whole debug model (MoE layer + MTP block MoE) under parallelize vs single process."""
    torch.manual_seed(2)
    cfg = _moe_config().replace(initializer_range=0.1)
    model = Transformer(cfg)
    ref = Transformer(cfg)
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2 * world, 12))
    labels = torch.roll(ids, -1, dims=1)
    out = ref(ids)
    lm_loss(out, labels, mtp_weight=0.3, balance_alpha=0.01).loss.backward()
    parallelize(model, mesh.config, mesh)
    sl = slice(2 * rank, 2 * rank + 2)
    o = model(ids[sl])
    loss = lm_loss(o, labels[sl], mtp_weight=0.3, balance_alpha=0.01).loss
    (loss / world).backward()
    worst_logits = (o.logits - out.logits[sl]).abs().max().item()
    worst_mtp = (o.mtp_logits[0] - out.mtp_logits[0][sl]).abs().max().item()
    ref_params = dict(ref.named_parameters())
    worst_grad = 0.0
    for name, p in model.named_parameters():
        g = p.grad.clone()
        r = ref_params[name].grad
        mod = model.get_submodule(name.rsplit(".", 2)[0]) if ".experts." in name else None
        if isinstance(mod, ExpertParallelMoE):
            lo, hi = mod.expert_range
            r = r[lo:hi]
        else:
            torch.distributed.all_reduce(g)
        worst_grad = max(worst_grad, ((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item())
    return {
        "logits": worst_logits,
        "mtp_logits": worst_mtp,
        "grad": worst_grad,
        "n_ep": sum(isinstance(m, ExpertParallelMoE) for m in model.modules()),
    }


def _worker(rank: int, world: int) -> dict:
    mesh = build_mesh(ParallelConfig(ep=world, nodes=2))
    E = _moe_config().n_routed_experts
    L = E // world
    skew = torch.zeros(E)
    skew[:L] = 5.0  # every token picks experts of rank 0 only: the other ranks receive zero rows
    res = {
        "plain": _moe_case(mesh, rank, world, None),
        "node_limited": _moe_case(_with(mesh, node_limit=1), rank, world, None),
        "uneven": _moe_case(mesh, rank, world, torch.linspace(-0.5, 0.5, E)),
        "zero_rows": _moe_case(mesh, rank, world, skew),
        "no_overlap_bf16": _moe_case(_with(mesh, overlap_shared=False, bf16_combine=True), rank, world, None),
        "fp8": _moe_case(_with(mesh, fp8_dispatch=True), rank, world, None, fp8=True),
        "model": _model_case(mesh, rank, world),
    }
    return res


@pytest.mark.parametrize("world", [2, 4])
def test_ep_matches_single_process(world):
    results = run_local(_worker, world, timeout_s=180)
    for rank, res in enumerate(results):
        for case in ("plain", "node_limited", "uneven", "zero_rows", "fp8"):
            r = res[case]
            for key in ("y", "dx", "experts", "gate", "shared"):
                assert r[key] < 1e-5, (rank, case, key, r[key])
            assert r["counts_ok"], (rank, case)
        # BF16 combine: BF16 rounding of the returned rows (relative 2^-9 per value)
        for key in ("y", "dx", "experts", "gate", "shared"):
            assert res["no_overlap_bf16"][key] < 1e-2, (rank, key, res["no_overlap_bf16"][key])
        m = res["model"]
        assert m["n_ep"] == 2  # main-model MoE layer and the MTP block's
        assert m["logits"] < 1e-5 and m["mtp_logits"] < 1e-5 and m["grad"] < 1e-5, (rank, m)
    assert results[0]["zero_rows"]["recv_rows"] > 0
    assert all(res["zero_rows"]["recv_rows"] == 0 for res in results[1:])
