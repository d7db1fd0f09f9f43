"""Routed-expert execution strategies for CPUs, swapped in for `GroupedExperts` at setup.

`GroupedExperts.forward_sorted` (torch's grouped GEMM) is the reference. On a CPU:

- `PaddedExperts` ("padded", training): one batched GEMM per projection over zero-padded rows. It runs
  near the matmul peak where CPU grouped_mm pays per group (about 4x slower at E=16); padding rows are
  zeros in and never read out, so they get no gradient. Balanced routing uses an [E, cap, D] layout,
  cap = the largest expert's rows rounded up to `CAP_ALIGN`; skewed routing (that layout would more
  than double the rows) cuts each expert's rows into `CHUNK`-row chunks, [n, CHUNK, D] with each
  chunk's expert weights gathered, n rounded up to `CHUNK_ALIGN` chunks. Either way the GEMM shapes
  take a handful of values whatever the routing does. That bounds memory: oneDNN keeps a compiled
  primitive per BF16 GEMM shape, and per-expert GEMMs with routing-dependent row counts (CPU grouped_mm,
  or an unrounded cap) grew a tiny-preset run's resident memory by ~130 MB per step to 3-5 GB.
- `ActiveExperts` ("active", decode): fewer rows than experts run one product per expert that received
  rows (CPU grouped_mm pays per group, empty or not); more rows run the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.moe import GroupedExperts

CAP_ALIGN = 128  # rows: the padded layout's cap is a multiple of this
CHUNK, CHUNK_ALIGN = 128, 8  # the chunked layout: rows per chunk; the chunk count is a multiple of this
PaddedLayout = tuple[torch.Tensor, int]  # (slot of each sorted row in [E * cap], cap)


def padded_slots(
    counts: torch.Tensor, rows: int, max_waste: float = 2.0, small: int = 1024, align: int = CAP_ALIGN
) -> PaddedLayout | None:
    """For rows sorted by expert (counts [E]): each row's slot in an [E, cap] padded layout, cap = the
    largest count rounded up to `align`; None when padding would multiply the rows by more than
    max_waste (skewed routing), unless the padded layout is small (<= `small` rows: per-call
    overhead, not FLOPs, decides there)."""
    E = counts.numel()
    if rows == 0:
        return None
    cap = -(-int(counts.max()) // align) * align
    if E * cap > max(max_waste * rows, small):
        return None
    expert = torch.repeat_interleave(torch.arange(E, device=counts.device), counts, output_size=rows)
    start = counts.cumsum(0) - counts
    return expert * cap + torch.arange(rows, device=counts.device) - start[expert], cap


def chunked_slots(counts: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows sorted by expert (counts [E]): each row's slot in an [n * CHUNK] layout where expert e
    owns ceil(counts[e] / CHUNK) consecutive chunks, and the expert of each of the n chunks (n rounded
    up to CHUNK_ALIGN; the extra chunks are zeros run through expert 0)."""
    E, dev = counts.numel(), counts.device
    per_expert = (counts + CHUNK - 1) // CHUNK
    n = -(-int(per_expert.sum()) // CHUNK_ALIGN) * CHUNK_ALIGN
    expert_of_chunk = torch.zeros(n, dtype=torch.long, device=dev)
    used = int(per_expert.sum())
    expert_of_chunk[:used] = torch.repeat_interleave(
        torch.arange(E, device=dev), per_expert, output_size=used
    )
    expert = torch.repeat_interleave(torch.arange(E, device=dev), counts, output_size=rows)
    row_start, chunk_start = counts.cumsum(0) - counts, per_expert.cumsum(0) - per_expert
    slot = chunk_start[expert] * CHUNK + torch.arange(rows, device=dev) - row_start[expert]
    return slot, expert_of_chunk


class PaddedExperts(GroupedExperts):
    """`GroupedExperts` over zero-padded batched GEMMs (the module docstring)."""

    backend = "padded"

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # bmm would autocast; the padding copy would not
            x = x.to(torch.get_autocast_dtype(x.device.type))
        rows = x.shape[0]
        if rows == 0:
            return super().forward_sorted(x, counts)
        w1, w2, w3 = (w.to(x.dtype).transpose(1, 2) for w in (self.w1, self.w2, self.w3))  # [E, in, out]
        layout = padded_slots(counts, rows)
        if layout is not None:  # [E, cap, D]: every expert's weights used as they are
            slot, cap = layout
            groups = self.n_experts
        else:  # [n, CHUNK, D]: each chunk with its expert's weights
            slot, expert_of_chunk = chunked_slots(counts, rows)
            cap, groups = CHUNK, expert_of_chunk.numel()
            w1, w2, w3 = (w.index_select(0, expert_of_chunk) for w in (w1, w2, w3))
        xp = x.new_zeros(groups * cap, x.shape[1]).index_copy(0, slot, x).view(groups, cap, -1)
        h = F.silu(torch.bmm(xp, w1)) * torch.bmm(xp, w3)
        return torch.bmm(h, w2).view(groups * cap, -1).index_select(0, slot)


class ActiveExperts(GroupedExperts):
    """`GroupedExperts` that runs only the experts with rows when there are fewer rows than experts."""

    backend = "active"

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.n_experts:
            return super().forward_sorted(x, counts)
        w1, w2, w3 = (w if w.dtype == x.dtype else w.to(x.dtype) for w in (self.w1, self.w2, self.w3))
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                xe = x[start : start + n]
                out[start : start + n] = F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])
                start += n
        return out


EXPERT_BACKENDS: dict[str, type[GroupedExperts]] = {
    "grouped_mm": GroupedExperts,
    "padded": PaddedExperts,
    "active": ActiveExperts,
}
