"""Expert-load recorder: sliding window, router stats extraction, JSON round trip."""

import json

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.inference.eplb import rebalance
from dsv3.inference.expert_load import ExpertLoadRecorder, router_counts
from dsv3.model import Transformer


def test_window_sums_the_last_steps():
    rec = ExpertLoadRecorder(num_layers=2, num_experts=3, window=4)
    steps = [torch.randint(0, 10, (2, 3)).double() for _ in range(7)]
    for i, s in enumerate(steps, start=1):
        rec.record(s)
        assert torch.equal(rec.load(), torch.stack(steps[max(0, i - 4) : i]).sum(0))
    assert rec.steps == 7 and rec.steps_in_window == 4
    assert torch.equal(rec.history(), torch.stack(steps[3:]))
    rec.record([torch.ones(3), torch.zeros(3)])  # a list of per-layer [E] tensors
    assert torch.equal(rec.history()[-1], torch.tensor([[1.0, 1, 1], [0, 0, 0]], dtype=torch.float64))
    rec.reset()
    assert rec.steps == 0 and rec.load().sum() == 0


def test_bad_input():
    with pytest.raises(ValueError, match="window must be a positive int"):
        ExpertLoadRecorder(2, 3, window=0)
    rec = ExpertLoadRecorder(2, 3)
    with pytest.raises(ValueError, match=r"shape \[2, 3\]"):
        rec.record(torch.ones(3, 2))
    with pytest.raises(ValueError, match="non-negative"):
        rec.record(-torch.ones(2, 3))
    with pytest.raises(ValueError, match="non-empty list"):
        rec.record([])


def test_router_counts_from_the_model():
    cfg = ModelConfig.from_preset("debug")
    model = Transformer(cfg)
    model.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        out = model(ids, with_mtp=True)
        plain = model(ids, with_mtp=False)
    L = len(model.moe_layers())
    counts = router_counts(out)
    assert counts.shape == (L, cfg.n_routed_experts)
    assert (counts.sum(-1) == 2 * 16 * cfg.num_experts_per_tok).all()  # every token picks K experts per layer
    padded = router_counts(plain, num_layers=L)  # no MTP on this forward: its layer routed nothing
    assert torch.equal(padded[: L - 1], counts[: L - 1]) and padded[L - 1 :].sum() == 0
    with pytest.raises(ValueError, match="more than num_layers"):
        router_counts(out, num_layers=L - 1)
    rec = ExpertLoadRecorder(L, cfg.n_routed_experts, window=8)
    rec.record(counts)
    rec.record(padded)
    p = rebalance(rec.load(), 2 * cfg.n_routed_experts, cfg.n_group, 2, 4)
    assert p.physical_to_logical.shape == (L, 16)


def test_json_round_trip_resumes_the_window(tmp_path):
    rec = ExpertLoadRecorder(2, 4, window=3)
    for _ in range(5):
        rec.record(torch.randint(0, 9, (2, 4)).double())
    path = tmp_path / "sub" / "expert_load.json"
    rec.to_json(path)
    assert [p.name for p in path.parent.iterdir()] == ["expert_load.json"]  # no temp file left behind
    d = json.loads(path.read_text())
    assert d["steps"] == 5 and d["window"] == 3 and torch.equal(torch.tensor(d["load"]).double(), rec.load())
    back = ExpertLoadRecorder.from_json(path)
    assert back.steps == 5 and torch.equal(back.load(), rec.load())
    nxt = torch.randint(0, 9, (2, 4)).double()
    rec.record(nxt)
    back.record(nxt)  # evicts the same (oldest) step as the original
    assert torch.equal(back.load(), rec.load()) and torch.equal(back.history(), rec.history())
    summary = ExpertLoadRecorder.from_dict(rec.to_dict(history=False))
    assert torch.equal(summary.load(), rec.load()) and summary.steps_in_window == 1


def test_from_json_rejects_foreign_or_inconsistent_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ExpertLoadRecorder.from_json(bad)
    with pytest.raises(ValueError, match="format"):
        ExpertLoadRecorder.from_dict({"load": [[1.0]]})
    d = ExpertLoadRecorder(1, 2).to_dict()
    d["steps"], d["load"], d["history"] = 1, [[5.0, 0.0]], [[[1.0, 0.0]]]
    with pytest.raises(ValueError, match="inconsistent"):
        ExpertLoadRecorder.from_dict(d)
