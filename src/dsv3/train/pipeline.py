"""Pipeline-parallel training: `dsv3 train --nproc N pp=P [dp=D] [pp_schedule=dualpipev] [pp_microbatches=M]`.

`PipelinePlan` is the trainer's parallel plan for pp > 1 (see dsv3.train.plans for the interface).
Every rank builds the same model (same seed), `parallelize`s it like every plan (with ep = 1 and no FP8
that makes the data-parallel replicas identical), cuts it into the schedule's stages (dsv3.parallel.pipeline:
1F1B, ZB1P, DualPipe or DualPipeV) and trains only the parameters of its own stages: the optimizer holds
those alone. A step is `PipelineRuntime.step` over the whole batch split into micro-batches (the same
batch on every rank), then:

- gradients of parameters two ranks hold (DualPipe's two copies of each stage, the embedding the last
  stage shares with the first for MTP) are summed (`sync_replicated_grads`);
- the global gradient norm counts each parameter once (on the lowest rank holding it);
- expert loads: each stage's counts, from the lowest rank holding the stage, all-reduced into the
  model's MoE-layer order, so every rank applies the same balance-bias update to every layer.

The numbers equal a single-process run with `micro_batch_size = batch / micro-batches` (the loss of a
step is the mean of the micro-batches' losses in both).

Memory: once the stages are cut, every parameter no local stage uses gives up its storage (its name
stays, holding an empty tensor), so a rank holds the weights, gradients and optimizer states of its
stages only. Checkpoints are sharded (each rank writes its stages' weights and optimizer states; `--resume`
restores each rank exactly). Evaluation runs through the pipeline's forward-only schedule. Sampling and
the HF export gather the whole model onto pipeline rank 0 (each parameter from the lowest rank holding
it); the sample is broadcast to every rank.

Data parallelism (`dp`): each replica of the pipeline takes its rows of the batch; the replicas average
their gradients (FP32 all-reduce) and losses, and add up their expert loads.

Limits of this version: pp combines with dp, not with ep (and not with FP8 or torch.compile: refused by
TrainConfig.validate); sampling and the HF export need room for the whole model on rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dsv3.config import ModelConfig, ParallelConfig, TrainConfig
from dsv3.model import IGNORE_INDEX, Transformer, lm_loss
from dsv3.parallel import Mesh, parallelize
from dsv3.parallel.pipeline import (
    PipelineRuntime,
    Schedule,
    build_stages,
    make_schedule,
    sync_expert_counts,
    sync_replicated_grads,
)
from dsv3.train.evaluate import eval_record, eval_windows
from dsv3.train.optim import grad_norm
from dsv3.train.plans import MakeOptimizer
from dsv3.train.step import (
    LossStep,
    Packing,
    apply_speed_paths,
    autocast_context,
    balance_alpha,
    new_model,
)


def pipeline_schedule(parallel_cfg: ParallelConfig, ranks: int) -> Schedule:
    """The schedule for `ranks` pipeline ranks (DualPipeV: two stages per rank)."""
    pc = parallel_cfg
    n = pc.pp_microbatches or 2 * ranks
    stages = 2 * ranks if pc.pp_schedule == "dualpipev" else ranks
    try:
        return make_schedule(pc.pp_schedule, stages, n)
    except ValueError as e:
        raise ValueError(f"invalid config: pp_schedule: {e}") from None


class PipelinePlan:
    """pp > 1 (x dp): each rank trains the parameters of its schedule's stages."""

    def __init__(self, mesh: Mesh, device: str | torch.device = "cpu"):
        self.mesh, self.device = mesh, torch.device(device)
        self.is_main = mesh.rank == 0
        # the rows of this data-parallel replica; every pipeline rank of the replica sees all of them
        self.data_rank, self.data_size = mesh.dp_rank, mesh.dp
        self.schedule = pipeline_schedule(mesh.config, mesh.pp)
        self.batch_multiple = mesh.dp * self.schedule.num_microbatches
        self._mtp_w = 0.0

    def barrier(self) -> None:
        dist.barrier(group=self.mesh.world_group)

    # ------------------------------------------------------------------ setup
    def build_model(self, model_config: ModelConfig, cfg: TrainConfig) -> Transformer:
        """The same full model on every rank (seeded), parallelized, then cut into this rank's stages;
        every parameter no local stage uses is freed."""
        self.model_config = model_config
        self._alpha, self._balance_loss = balance_alpha(model_config, cfg), cfg.balance_loss
        mesh, group = self.mesh, self.mesh.pp_group
        model = parallelize(new_model(model_config, cfg, self.device), mesh.config, mesh)
        # "auto" keeps the reference experts here: the schedules' weight-gradient split wraps those
        apply_speed_paths(model, cfg, self.device, auto="grouped_mm")
        self.model = model
        self.stages = build_stages(model, self.schedule.stages_of(mesh.pp_rank), self.schedule.num_stages)
        self.runtime = PipelineRuntime(self.schedule, self.stages, group=group, loss_fn=self._loss)
        local = {n: p for st in self.stages.values() for n, p in st.named_parameters()}
        everyone: list = [None] * mesh.pp
        dist.all_gather_object(everyone, sorted(local), group=group)
        self._owner: dict[str, int] = {}  # parameter name -> lowest pipeline rank holding it
        for r, names in enumerate(everyone):
            for n in names:
                self._owner.setdefault(n, r)
        self._local = local
        self._free_nonlocal(model)
        self._stage_owner = {
            s: min(r for r in range(mesh.pp) if s in self.schedule.stages_of(r))
            for s in range(self.schedule.num_stages)
        }
        return model

    def build_optimizer(self, model: Transformer, make: MakeOptimizer) -> torch.optim.Optimizer:
        """AdamW over this rank's stages only (the embedding counted once when two local stages share it)."""
        self.optimizer = make(torch.nn.ModuleList(self.stages.values()))
        return self.optimizer

    def _loss(self, out, labels):  # type: ignore[no-untyped-def]
        return lm_loss(out, labels, self._mtp_w, self._alpha, self._balance_loss)

    # ------------------------------------------------------------------ one step
    def forward_backward(
        self,
        loss: LossStep,
        x: torch.Tensor,
        y: torch.Tensor,
        mtp_weight: float,
        micro: int | None,
        packing: Packing = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The schedule over the replica's rows (its micro-batches: rows / pp_microbatches each)."""
        if packing:
            raise ValueError("packed samples (SFT) do not run under pipeline parallelism (pp > 1) yet")
        mesh = self.mesh
        self._mtp_w = mtp_weight
        with autocast_context(loss.dtype, self.device):
            result = self.runtime.step(x, y)
        sync_replicated_grads(self.stages, mesh.pp_group)
        sync_expert_counts(self.stages, mesh.pp_group)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sums = torch.stack([result.parts[k] for k in ("loss", "main_loss", "mtp_loss", "balance_loss")])
        sums = sums.detach().float().cpu()
        if mesh.dp > 1:  # average the replicas' gradients and losses (FP32)
            self._average_over_replicas([p.grad for p in params if p.grad is not None])
            t = sums.to(self.device, torch.float64)
            dist.all_reduce(t, group=mesh.data_group)
            sums = (t / mesh.data_size).to("cpu", torch.float32)
        return sums, self._global_counts(), self._grad_norm()

    def _average_over_replicas(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.mesh.data_group)
        flat /= self.mesh.dp
        off = 0
        for g in grads:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm, each parameter counted once over the pipeline ranks."""
        me = self.mesh.pp_rank
        mine = [p for n, p in self._local.items() if self._owner[n] == me]
        sq = (grad_norm(mine) ** 2).to(torch.float64).reshape(1)
        dist.all_reduce(sq, group=self.mesh.pp_group)
        return sq.sqrt().float()[0]

    def _global_counts(self) -> list[torch.Tensor]:
        """Per-MoE-layer expert loads of the batch, in `model.moe_layers()` order, on every rank."""
        cfg, E = self.model_config, self.model_config.n_routed_experts or 0
        n_main = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        n_all = len(self.model.moe_layers())
        if n_all == 0:
            return []
        table = torch.zeros(n_all, E, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors
        for s, st in self.stages.items():
            if self._stage_owner[s] != self.mesh.pp_rank:
                continue
            rows = st.expert_counts.double().to(self.device)
            k = len(st.moe_here)
            table[st.moe_before : st.moe_before + k] += rows[:k]
            if st.is_last:
                table[n_main:] += rows[k:]
        dist.all_reduce(table, group=self.mesh.pp_group)
        if self.mesh.dp > 1:
            dist.all_reduce(table, group=self.mesh.data_group)
        return [r.float().cpu() for r in table.unbind(0)]

    # ------------------------------------------------------------------ whole-model operations
    @torch.no_grad()
    def _free_nonlocal(self, model: Transformer) -> None:
        """Drop the storage of every parameter no local stage uses (their names keep empty tensors, so
        state dicts keep one key set); the shapes are kept for gathering the full model."""
        self._shapes = {n: p.shape for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            if n not in self._local:
                p.data = p.data.new_empty(0)

    def param_counts(self, model: Transformer) -> tuple[int, int]:
        total = sum(s.numel() for s in self._shapes.values())
        mtp = sum(s.numel() for n, s in self._shapes.items() if n.startswith("mtp."))
        return total - mtp, total

    @torch.no_grad()
    def gather_model(self, model: Transformer) -> Transformer | None:
        """Collective over the pipeline: the whole up-to-date model on pipeline rank 0 (None elsewhere).
        Each parameter comes from the lowest rank holding it; buffers (balance biases, RoPE) are the
        same on every rank and come from rank 0's copy."""
        if self.mesh.dp_rank != 0:  # one replica's pipeline gathers; the others hold the same weights
            return None
        me, group = self.mesh.pp_rank, self.mesh.pp_group
        local = {n: p for n, p in model.named_parameters() if n in self._local}
        full: Transformer | None = None
        if me == 0:
            with torch.device("meta"):
                full = Transformer(self.model_config)
            full = full.to_empty(device=self.device)
            for n, b in model.named_buffers():
                full.get_buffer(n).copy_(b)
            if self.model_config.tie_word_embeddings:
                full.head.weight = full.embed.weight
        params = dict(full.named_parameters()) if full is not None else {}
        for r in range(self.mesh.pp):
            names = sorted(n for n, o in self._owner.items() if o == r)
            if not names:
                continue
            if r == 0 and me == 0:
                for n in names:
                    params[n].copy_(local[n])
            elif r == me:
                dist.send(torch.cat([local[n].reshape(-1).float() for n in names]), group_dst=0, group=group)
            elif me == 0:
                flat = torch.empty(sum(params[n].numel() for n in names), device=self.device)
                dist.recv(flat, group_src=r, group=group)
                off = 0
                for n in names:
                    k = params[n].numel()
                    params[n].copy_(flat[off : off + k].view_as(params[n]))
                    off += k
        return full.eval() if full is not None else None

    def on_full_model(self, model: Transformer, fn: Callable[[Transformer], Any]) -> Any:
        """fn(full model) on rank 0 (gathered by the first replica's pipeline); its result broadcast to
        every rank."""
        full = self.gather_model(model)
        box = [fn(full) if full is not None else None]
        dist.broadcast_object_list(box, src=0, group=self.mesh.world_group)
        return box[0]

    @torch.no_grad()
    def evaluate(
        self, model: Transformer, windows: np.ndarray, token_bytes: Any, batch_size: int,
        dtype: torch.dtype, max_batches: int | None,
    ) -> dict[str, float]:  # fmt: skip
        """Validation through the pipeline (forward-only schedule): no rank needs the whole model.

        Each batch of windows runs as its largest multiple of the micro-batch count N, then the k < N
        windows left over as N one-row micro-batches of which N - k are padding (no targets, not
        counted); a micro-batch's mean CE times its target count gives its nats. Every data-parallel
        replica evaluates the same windows, so all ranks log the same figures."""
        N = self.schedule.num_microbatches
        windows = eval_windows(windows, batch_size, max_batches)
        lengths = torch.as_tensor(np.asarray(token_bytes, dtype=np.int64))
        nats, tokens, nbytes = 0.0, 0, 0
        model.eval()
        try:
            for i in range(0, len(windows), batch_size):
                w = torch.from_numpy(windows[i : i + batch_size])
                m = w.shape[0] // N * N
                for part, real_rows in ((w[:m], m), (w[m:], w.shape[0] - m)):
                    if real_rows == 0:
                        continue
                    nats += self._eval_nats(part, real_rows, dtype)
                    tokens += part[:, 1:].numel()
                    nbytes += int(lengths[part[:, 1:]].sum())
        finally:
            model.train()
        return eval_record(nats, tokens, nbytes)

    def _eval_nats(self, w: torch.Tensor, k: int, dtype: torch.dtype) -> float:
        """Summed CE (nats) over windows w [k, T+1]: k a multiple of N, or k < N padded to N rows."""
        N = self.schedule.num_microbatches
        if k < N:
            w = torch.cat([w, w[:1].expand(N - k, -1)])
        x, y = w[:, :-1].clone(), w[:, 1:].clone()
        y[k:] = IGNORE_INDEX
        with autocast_context(dtype, self.device):
            table = self.runtime.step(x.to(self.device), y.to(self.device)).losses
        per_mb = y.shape[0] // N * y.shape[1]  # targets per micro-batch
        counted = torch.tensor([per_mb if j * (y.shape[0] // N) < k else 0 for j in range(N)])
        return float(torch.where(counted > 0, table[:, 1].double() * counted, 0.0).sum())
