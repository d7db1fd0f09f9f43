"""Pipeline stages cut from a dsv3 `Transformer`, and the sequential reference they must reproduce.

Stage s of S holds a contiguous run of decoder layers (an even split by default). The first stage also
holds the embedding; the last holds the final norm, the output head and the MTP modules. MTP shares the
embedding with the main model, so the last stage holds a reference to the embedding too (and to it again
under tied embeddings). Under DualPipe and DualPipeV the first and last stages sit on the same rank (the
paper places "the shallowest layers (including the embedding) and the deepest layers (including the
output head) on the same PP rank" for exactly this reason), so both stages see one embedding tensor. Under
1F1B/ZB1P the last rank holds a replica whose gradient `sync_replicated_grads` (runtime.py) adds to the
first rank's, as it does for DualPipe's two copies of every stage.

Modules are shared with the model, not copied, and a stage's parameter names are the model's
(`layers.3.attn.wq_a.weight`, `embed.weight`, `mtp.0.eh_proj.weight`), so state dicts and gradient
comparisons line up with the single-device model.

What crosses a stage boundary: the hidden state [b, T, D] and, when MoE layers came before it, their
balance-loss terms as a [k, 2] float32 tensor (sequence-wise, batch-wise), one row per MoE layer in
forward order. The last stage rebuilds the router statistics from those rows and calls the model's own
`lm_loss`, so the loss of a micro-batch is computed by the same operations on the same values as in the
single-device model, and is bit-identical to it.

Combining micro-batches: the per-micro-batch losses form an [N, 4] float32 table (loss, main, MTP,
balance) and the step's losses are `table.mean(dim=0)`; the backward of micro-batch i is driven by
loss_i / N. `sequential_step` does exactly this on one device, so pipeline and reference agree bit for bit
on the loss (gradients differ only by summation order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3.model.block import run_blocks
from dsv3.model.moe import MoE, RouterStats
from dsv3.model.mtp import mtp_forward
from dsv3.model.rope import rope_cos_sin
from dsv3.model.transformer import LossOutput, ModelOutput, Transformer, lm_loss

LossFn = Callable[[ModelOutput, torch.Tensor], LossOutput]


def split_layers(num_layers: int, num_stages: int, layers_per_stage: list[int] | None = None) -> list[range]:
    """Layer ranges of the stages: an even split, or the given counts (each >= 1, summing to num_layers)."""
    if num_stages < 1:
        raise ValueError(f"the number of pipeline stages must be >= 1, got {num_stages}")
    if layers_per_stage is None:
        if num_layers % num_stages:
            raise ValueError(
                f"num_hidden_layers={num_layers} is not divisible into {num_stages} pipeline stages; "
                "pass layers_per_stage to split unevenly"
            )
        layers_per_stage = [num_layers // num_stages] * num_stages
    if len(layers_per_stage) != num_stages or any(n < 1 for n in layers_per_stage):
        raise ValueError(f"layers_per_stage must be {num_stages} counts >= 1, got {layers_per_stage}")
    if sum(layers_per_stage) != num_layers:
        raise ValueError(
            f"layers_per_stage {layers_per_stage} sums to {sum(layers_per_stage)}, not {num_layers}"
        )
    starts = [sum(layers_per_stage[:i]) for i in range(num_stages)]
    return [range(a, a + n) for a, n in zip(starts, layers_per_stage)]


class PipelineStage(nn.Module):
    """Stage `index` of `num_stages` of a Transformer (see the module docstring).

    forward(*inputs, input_ids): the first stage takes (input_ids,), the others (hidden,) or (hidden,
    stats); a middle stage returns (hidden,) or (hidden, stats), the last a ModelOutput."""

    def __init__(
        self, model: Transformer, index: int, num_stages: int, layers: range, ship_stats: bool = True
    ) -> None:
        super().__init__()
        cfg = model.config
        self.config = cfg
        self.index, self.num_stages = index, num_stages
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.ship_stats = ship_stats
        if self.is_first or (self.is_last and (len(model.mtp) > 0 or cfg.tie_word_embeddings)):
            self.embed = model.embed
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        if self.is_last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        self.register_buffer("inv_freq", model.inv_freq.detach().clone(), persistent=False)
        self.rope_attn_factor = model.rope_attn_factor
        self.moe_before = sum(cfg.is_moe_layer(i) for i in range(layers.start))  # stats rows received
        self.moe_here = [i for i in layers if cfg.is_moe_layer(i)]
        n_moe = len(self.moe_here) + (
            sum(isinstance(m.block.ffn, MoE) for m in model.mtp) if self.is_last else 0
        )
        self.register_buffer("expert_counts", torch.zeros(n_moe, cfg.n_routed_experts or 0), persistent=False)

    def input_spec(
        self, batch: int, seq: int, dtype: torch.dtype
    ) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of what this stage receives from the previous one (and sends the gradient of)."""
        return [] if self.is_first else self._spec(self.moe_before, batch, seq, dtype)

    def output_spec(
        self, batch: int, seq: int, dtype: torch.dtype
    ) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of what this stage sends to the next one (and receives the gradient of)."""
        return [] if self.is_last else self._spec(self.moe_before + len(self.moe_here), batch, seq, dtype)

    def _spec(
        self, rows: int, batch: int, seq: int, dtype: torch.dtype
    ) -> list[tuple[tuple[int, ...], torch.dtype]]:
        spec = [((batch, seq, self.config.hidden_size), dtype)]
        if self.ship_stats and rows > 0:
            spec.append(((rows, 2), torch.float32))
        return spec

    def reset_expert_counts(self) -> None:
        self.expert_counts.zero_()

    def forward(self, *inputs: torch.Tensor, input_ids: torch.Tensor | None = None):
        if self.is_first:
            (ids,) = inputs
            x = self.embed(ids)
            prev = None
        else:
            x = inputs[0]
            prev = inputs[1] if len(inputs) > 1 else None
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(
            positions, self.inv_freq, self.rope_attn_factor, x.dtype, self.config.rope_interleave
        )
        x, stats = run_blocks(self.layers.values(), x, cos, sin)
        if not self.is_last:
            return (
                (x,)
                if not self.ship_stats or self.moe_before + len(stats) == 0
                else (x, self._rows(prev, stats))
            )
        # last stage: the model's own tail (final norm, head, MTP) on the received router stats
        received = [] if prev is None else [RouterStats.of(None, row[0], row[1]) for row in prev]
        hidden = self.norm(x)
        out = ModelOutput(logits=self.head(hidden), hidden=hidden, router_stats=received + stats)
        if len(self.mtp) > 0:
            if input_ids is None:
                raise ValueError("the last pipeline stage needs input_ids for its MTP modules")
            out.mtp_logits, mtp_stats = mtp_forward(
                self.mtp, self.embed, self.head, hidden, input_ids, cos, sin
            )
            out.router_stats.extend(mtp_stats)
            stats.extend(mtp_stats)
        self._count(stats)
        return out

    def _rows(self, prev: torch.Tensor | None, stats: list[RouterStats]) -> torch.Tensor:
        """Append this stage's balance terms to the received rows: [k_prev + k_here, 2] float32."""
        self._count(stats)
        rows = [torch.stack([s.seq_balance_loss.float(), s.aux_loss.float()]) for s in stats]
        if prev is None:
            return torch.stack(rows)
        return torch.cat([prev, torch.stack(rows)]) if rows else torch.cat([prev, prev.new_zeros(0, 2)])

    @torch.no_grad()
    def _count(self, stats: list[RouterStats]) -> None:
        for i, s in enumerate(stats):
            self.expert_counts[i] += s.counts.to(self.expert_counts.dtype)


def build_stages(
    model: Transformer,
    stage_ids: list[int],
    num_stages: int,
    layers_per_stage: list[int] | None = None,
    ship_stats: bool = True,
) -> dict[int, PipelineStage]:
    """The stages `stage_ids` of a `num_stages`-stage cut of `model` (modules shared with the model)."""
    ranges = split_layers(model.config.num_hidden_layers, num_stages, layers_per_stage)
    for s in stage_ids:
        if not 0 <= s < num_stages:
            raise ValueError(f"stage {s} out of range for {num_stages} stages")
    if any(isinstance(m, MoE) for m in model.modules()) and not model.config.is_moe:
        raise ValueError("model has MoE layers but its config says it has none")
    return {s: PipelineStage(model, s, num_stages, ranges[s], ship_stats) for s in stage_ids}


# ---------------------------------------------------------------------- results and the reference
@dataclass
class StepResult:
    """One pipeline (or reference) step. `losses` [N, 4]: loss, main, MTP, balance per micro-batch."""

    losses: torch.Tensor
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # micro-batch -> logits (when asked)
    timeline: list[tuple[str, float, float]] = field(default_factory=list)  # (action, start, end) seconds
    wall_s: float = 0.0  # the step's wall time on this rank
    wait_s: float = 0.0  # of which blocked waiting for communication (the measured bubble)

    @property
    def loss(self) -> torch.Tensor:
        return combine_losses(self.losses)[0]

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        m = combine_losses(self.losses)
        return {"loss": m[0], "main_loss": m[1], "mtp_loss": m[2], "balance_loss": m[3]}


def combine_losses(table: torch.Tensor) -> torch.Tensor:
    """[N, 4] per-micro-batch losses -> [4] step losses (a plain mean: one code path for both sides)."""
    return table.mean(dim=0)


def loss_row(lo: LossOutput) -> torch.Tensor:
    return torch.stack([lo.loss.detach(), lo.main_loss, lo.mtp_loss, lo.balance_loss]).float()


def split_microbatches(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    if x.shape[0] % n:
        raise ValueError(f"batch size {x.shape[0]} is not divisible into {n} micro-batches")
    return list(x.chunk(n, dim=0))


def sequential_step(
    model: Transformer,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    num_microbatches: int,
    loss_fn: LossFn = lm_loss,
    return_outputs: bool = False,
) -> StepResult:
    """The single-device reference: each micro-batch through the whole model, backward of loss_i / N
    (when grad is enabled and labels are given), losses combined as the pipeline combines them."""
    ids = split_microbatches(input_ids, num_microbatches)
    lbl = split_microbatches(labels, num_microbatches) if labels is not None else [None] * num_microbatches
    rows, outputs = [], {}
    for i, (x, y) in enumerate(zip(ids, lbl)):
        out = model(x)
        if return_outputs:
            outputs[i] = out.logits.detach()
        if y is None:
            rows.append(torch.zeros(4))
            continue
        lo = loss_fn(out, y)
        if torch.is_grad_enabled():
            (lo.loss / num_microbatches).backward()
        rows.append(loss_row(lo))
    return StepResult(losses=torch.stack(rows), outputs=outputs)
