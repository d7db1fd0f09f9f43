"""One `Engine` per rank over an expert-parallel model, stepping in lockstep.

Attention is data parallel: each rank's Engine owns its own requests, latent cache and batch, exactly as
on a single device. Only the MoE layers communicate (dsv3.inference.ep), so the ranks must run their MoE
layers together: `EPEngine.step()` runs the local engine step (prefill of newly admitted requests and/or
one decode; nothing when this rank has no work) and then `ExpertParallelInference.sync`, which serves the
other ranks' layers until all of them are done with this step and tells whether any rank has work left.
Every rank therefore calls `step()` the same number of times; a step boundary is where the placement may
be swapped (`rebalance`), with the requests in flight untouched (their caches do not depend on it).

Expert load is recorded per step (this rank's tokens per logical expert) into an ExpertLoadRecorder;
`rebalance` sums the window over the ranks, so every rank computes the same placement.
"""

from __future__ import annotations

from collections.abc import Sequence

from dsv3.inference.engine import Engine, RequestOutput, StepOutput
from dsv3.inference.ep import ExpertParallelInference
from dsv3.inference.eplb import Placement
from dsv3.inference.expert_load import ExpertLoadRecorder
from dsv3.inference.sampling import SamplingParams


class EPEngine:
    """Lockstep driver: call `step()` / `run()` / `generate()` on every rank (see module doc)."""

    def __init__(self, engine: Engine, ep: ExpertParallelInference, window: int = 1000):
        if engine.model is not ep.model:
            raise ValueError("the engine must run the model that apply_ep_inference converted")
        self.engine = engine
        self.ep = ep
        self.recorder = ExpertLoadRecorder(ep.num_layers, ep.num_experts, window)
        self.steps = 0
        self._ids = 0

    def step(self) -> tuple[list[StepOutput], bool]:
        """One lockstep step: (this rank's outputs, whether any rank still has unfinished requests)."""
        outputs = self.engine.step() if self.engine.has_unfinished() else []
        more = self.ep.sync(self.engine.has_unfinished())
        self.recorder.record(self.ep.routed_counts())
        self.steps += 1
        return outputs, more

    def run(self) -> list[RequestOutput]:
        """Step until every rank is done; this rank's finished requests in completion order."""
        done: list[RequestOutput] = []
        more = True
        while more:
            outputs, more = self.step()
            done += [o.output for o in outputs if o.finished]
        return done

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """This rank's prompts (possibly none) -> their outputs in prompt order. Collective."""
        ids = []
        for p in prompts:
            rid = f"ep{self.ep.rank}-{self._ids}"
            self._ids += 1
            self.engine.add_request(rid, p, params)
            ids.append(rid)
        by_id = {o.request_id: o for o in self.run()}
        return [by_id[i] for i in ids]

    def rebalance(self, num_replicas: int, num_groups: int | None = None, num_nodes: int = 1) -> Placement:
        """New placement from the recorded window of every rank (all-reduced), installed now. Collective."""
        return self.ep.rebalance(self.recorder.load(), num_replicas, num_groups, num_nodes)
