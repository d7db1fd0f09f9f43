"""Routed-expert execution strategies for CPUs, swapped in for `GroupedExperts` at setup.

`GroupedExperts.forward_sorted` (torch's grouped GEMM) is the reference. On a CPU:

- `PaddedExperts` ("padded", training): one batched GEMM per projection over an [E, cap, D]
  zero-padded layout. It runs near the matmul peak where CPU grouped_mm pays per group (about 4x slower
  at E=16); padding rows are zeros in and never read out, so they get no gradient. cap is the largest
  expert's row count rounded up to `CAP_ALIGN` rows, so the buffers take a few sizes whatever the
  routing does (an unrounded cap gave every step new sizes, and the heap of a long run grew to GBs).
  Skewed routing (padding more than doubles the rows) runs the reference grouped GEMM instead.
- `ActiveExperts` ("active", decode): fewer rows than experts run one product per expert that received
  rows (CPU grouped_mm pays per group, empty or not); more rows run the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.moe import GroupedExperts

CAP_ALIGN = 128  # rows: the padded layout's cap is a multiple of this
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


class PaddedExperts(GroupedExperts):
    """`GroupedExperts` over a zero-padded [E, cap, D] layout (the module docstring)."""

    backend = "padded"

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # bmm would autocast; the padding copy would not
            x = x.to(torch.get_autocast_dtype(x.device.type))
        layout = padded_slots(counts, x.shape[0])
        if layout is None:
            return super().forward_sorted(x, counts)
        slot, cap = layout  # pad once, run the whole SwiGLU on [E, cap, .], unpad once
        E = self.n_experts
        w1, w2, w3 = (w.to(x.dtype).transpose(1, 2) for w in (self.w1, self.w2, self.w3))
        xp = x.new_zeros(E * cap, x.shape[1]).index_copy(0, slot, x).view(E, cap, -1)
        h = F.silu(torch.bmm(xp, w1)) * torch.bmm(xp, w3)
        return torch.bmm(h, w2).view(E * cap, -1).index_select(0, slot)


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
