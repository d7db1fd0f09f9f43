"""Expert-parallel inference with redundant experts over gloo: greedy outputs equal single-process ones."""

from __future__ import annotations

import copy

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.inference import Engine, SamplingParams
from dsv3.inference.ep import RedundantExpertMoE, apply_ep_inference
from dsv3.inference.ep_engine import EPEngine
from dsv3.inference.eplb import identity_placement, rebalance
from dsv3.model import Transformer
from dsv3.parallel import run_local

SPEC_PARAMS = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
E = 8  # debug preset: 8 experts in 4 groups, top-2, one shared expert; 1 main MoE layer + the MTP block's


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug").replace(initializer_range=0.1)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(1)
    for moe in model.moe_layers():  # skewed routing: some experts hot, so EPLB replicates them
        moe.gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    return model.eval()


def _requests() -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(7):
        n = int(torch.randint(2, 14, (1,), generator=g))
        prompt = torch.randint(0, 320, (n,), generator=g).tolist()
        out.append((prompt, SamplingParams(max_new_tokens=3 + 2 * (i % 4), temperature=0, ignore_eos=True)))
    return out


def _mine(rank: int, world: int) -> list[int]:
    """Uneven shares: the last rank gets no request at all (it only serves its experts)."""
    return [i for i in range(len(_requests())) if i % max(world - 1, 1) == rank and rank < world - 1]


def _generate(epe: EPEngine, idx: list[int]) -> list[list[int]]:
    reqs = _requests()
    outs = []
    for i in idx:  # one request at a time through generate() would serialise: add all, then run
        epe.engine.add_request(f"r{i}-{epe.steps}", reqs[i][0], reqs[i][1])
    done = {o.request_id: o.token_ids for o in epe.run()}
    for i in idx:
        outs.append(next(v for k, v in done.items() if k.startswith(f"r{i}-")))
    return outs


def _slots_hold_logical(ep, original: list[tuple[torch.Tensor, ...]]) -> bool:
    for layer in ep.layers:
        ids = layer.slot_experts
        for name, w in zip(("w1", "w2", "w3"), original[layer.layer]):
            if not torch.equal(getattr(layer.experts, name), w[ids]):
                return False
    return True


def _speculative(rank: int, world: int) -> dict:
    """MTP speculative decoding under EP: main and MTP-block MoE forwards alternate on every rank."""
    model = _model()
    ep = apply_ep_inference(model)  # 8 experts on 3 ranks: default placement has 9 slots (1 redundant)
    epe = EPEngine(Engine(model, max_batch_size=2, max_seq_len=64, speculative=True), ep)
    reqs = _requests()
    mine = _mine(rank, world)
    outs = epe.generate([reqs[i][0] for i in mine], SPEC_PARAMS)
    return {"mine": mine, "tokens": [o.token_ids for o in outs], "slots": ep.placement.num_replicas}


def _worker(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    model = _model()
    original = [
        (m.experts.w1.clone(), m.experts.w2.clone(), m.experts.w3.clone()) for m in model.moe_layers()
    ]
    ep = apply_ep_inference(model)
    epe = EPEngine(Engine(model, max_batch_size=2, max_seq_len=64), ep)
    mine = _mine(rank, world)
    res: dict = {"mine": mine, "identity_slots": ep.layers[0].slot_experts.tolist()}
    res["identity"] = _generate(epe, mine)
    # 1. redundant placement from the recorded load (summed over ranks), one extra slot per rank
    ep.rank_load()
    res["routed"] = ep.all_reduce(epe.recorder.load().clone())
    placement = epe.rebalance(num_replicas=E + world)
    res["replicas"] = placement.replica_count.tolist()
    res["slots_ok_1"] = _slots_hold_logical(ep, original)
    res["rebalanced"] = _generate(epe, mine)
    # 2. placement swaps in the middle of a run (requests in flight): by all-to-all, then from full copies
    reqs = _requests()
    for i in mine:
        epe.engine.add_request(f"swap{i}", reqs[i][0], reqs[i][1])
    flipped = rebalance(
        torch.rand(2, E, generator=torch.Generator().manual_seed(5)) * 100, E + 2 * world, 4, 1, world
    )
    steps, more, done = 0, True, {}
    while more:
        if steps == 2:
            ep.set_placement(flipped)
            res["slots_ok_2"] = _slots_hold_logical(ep, original)
            res["flipped_slots"] = ep.layers[0].slot_experts.tolist()
        if steps == 4:
            ep.set_placement(identity_placement(2, E, world), full_experts=original)
            res["slots_ok_3"] = _slots_hold_logical(ep, original)
        outputs, more = epe.step()
        done.update({o.request_id: o.output.token_ids for o in outputs if o.finished})
        steps += 1
    res["swap_steps"] = steps
    res["swapped"] = [done[f"swap{i}"] for i in mine]
    # 3. processed rows are conserved: sum over ranks of rows computed == routed (token, expert) pairs
    ep.rank_load()
    res["conserved"] = _conserved(epe, mine)
    # 4. ranks that disagree on the layer raise on every rank instead of deadlocking
    try:
        tag = 0 if rank == 0 else 1
        ep.layers[tag].counts_round(torch.zeros(world, dtype=torch.long), tag)
        res["lockstep_error"] = None
    except RuntimeError as e:
        res["lockstep_error"] = str(e)
    return res


def _conserved(epe: EPEngine, mine: list[int]) -> bool:
    reqs = _requests()
    for i in mine:
        epe.engine.add_request(f"c{i}", reqs[i][0], reqs[i][1])
    before = epe.steps
    epe.run()
    load = epe.ep.rank_load()  # [L, G]
    routed = epe.ep.all_reduce(epe.recorder.history()[before - epe.steps :].sum(0))  # [L, E]
    return bool(torch.equal(load.sum(-1), routed.sum(-1))) and bool(load.sum() > 0)


def _single_process(params: SamplingParams | None = None) -> list[list[int]]:
    model = _model()
    engine = Engine(model, max_batch_size=8, max_seq_len=64)
    reqs = _requests()
    for i, (p, sp) in enumerate(reqs):
        engine.add_request(str(i), p, params or sp)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.output.token_ids for o in engine.step() if o.finished})
    return [done[str(i)] for i in range(len(reqs))]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    return _single_process()


@pytest.mark.parametrize("world", [2, 4])
def test_ep_inference_matches_single_process(world, reference):
    results = run_local(_worker, world, timeout_s=120)
    served = sorted(i for r in results for i in r["mine"])
    assert served == list(range(len(reference)))
    assert results[-1]["mine"] == []  # a rank with no requests of its own still serves its experts
    for res in results:
        want = [reference[i] for i in res["mine"]]
        assert res["identity"] == want
        assert res["rebalanced"] == want
        assert res["swapped"] == want
        assert res["slots_ok_1"] and res["slots_ok_2"] and res["slots_ok_3"]
        assert res["conserved"]
        assert res["lockstep_error"] is not None and "lockstep" in res["lockstep_error"]
    r0 = results[0]
    assert sorted(s for r in results for s in r["identity_slots"]) == list(range(E))
    # the recorded load is skewed enough that the hottest expert got an extra replica in the main layer
    hottest = int(r0["routed"][0].argmax())
    assert r0["replicas"][0][hottest] >= 2 and sum(r0["replicas"][0]) == E + world
    assert r0["swap_steps"] > 4  # both swaps happened while requests were in flight


def test_ep_speculative_on_ranks_that_do_not_divide_the_experts():
    results = run_local(_speculative, 3, timeout_s=120)
    want = _single_process(SPEC_PARAMS)
    assert results[0]["slots"] == 9
    assert sorted(i for r in results for i in r["mine"]) == list(range(len(want)))
    for res in results:
        assert res["tokens"] == [want[i] for i in res["mine"]]


def test_single_process_ep_equals_model_and_checks_placements():
    model = _model()
    ref = copy.deepcopy(model)
    ep = apply_ep_inference(model, keep_full_experts=True)
    assert sum(isinstance(m, RedundantExpertMoE) for m in model.modules()) == 2
    ids = torch.randint(0, 320, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = ref(ids)
        got = model(ids)
        assert torch.equal(got.logits, want.logits) and torch.equal(got.mtp_logits[0], want.mtp_logits[0])
        ep.set_placement(rebalance(torch.arange(1.0, 17.0).view(2, E), 13, 4, 1, 1))
        assert ep.layers[0].n_local == 13
        assert (model(ids).logits - want.logits).abs().max() < 1e-5
        assert ep.rank_load().sum() > 0
    with pytest.raises(ValueError, match="GPUs"):
        ep.set_placement(identity_placement(2, E, 2))
    with pytest.raises(ValueError, match="layers"):
        ep.set_placement(identity_placement(1, E, 1))
    with pytest.raises(ValueError, match="experts"):
        ep.set_placement(identity_placement(2, 16, 1))
    with pytest.raises(ValueError, match="inference-only"):
        model(ids)
    with pytest.raises(ValueError, match="already"):
        apply_ep_inference(model)
    # FP8 dispatch: E4M3 rows with 1x128 scales on the wire, outputs close to the exact ones
    fp8 = copy.deepcopy(ref)
    apply_ep_inference(fp8, fp8_dispatch=True, combine_dtype=torch.bfloat16)
    with torch.inference_mode():
        err = (fp8(ids).logits - want.logits).abs().max() / want.logits.abs().max()
    assert 0 < err < 0.05
