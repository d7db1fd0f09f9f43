"""Prefill and decode: the model run over the latent cache.

- prefill: a batch of new prompts, right-padded, through the naive (training) attention path. Causal
  attention means a real token never sees the padding after it, and MoE routing is per token, so padding
  changes nothing for the real tokens; the cache lengths record the real prompt lengths.
- decode: S new tokens per running row (S = 1 plain, 1 + k when verifying k drafts) through the absorbed
  path, each row at its own position over its own cache length (per-row positions and mask).
- the MTP module (depth 1) runs the same way on the cache layer num_hidden_layers: at position i it reads
  the main model's final hidden state h_i and the embedding of token t_{i+1} and predicts t_{i+2}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.cpu import apply_cpu_inference
from dsv3.inference.cache import CacheView, LatentKVCache
from dsv3.model import Transformer
from dsv3.model.mla import score_bias


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [n, V] at each prompt's last token
    hidden: torch.Tensor  # [n, P, D] final normalised hidden states (padded)
    ids: torch.Tensor  # [n, P] the padded prompts
    lengths: torch.Tensor  # [n]


class ModelRunner:
    """Owns nothing but references: the model (eval mode) and the cache it writes. On CPU the model
    gets the CPU inference speed paths (`dsv3.cpu.apply_cpu_inference`, module swaps, same numbers)."""

    def __init__(self, model: Transformer, cache: LatentKVCache):
        self.model = model
        self.cache = cache
        self.device = model.embed.weight.device
        # inference_mode is the cheapest no-autograd mode, but FP8 modules key their caches on tensor
        # version counters, which inference tensors lack: those run under no_grad
        fp8 = any(hasattr(m, "fp8_config") for m in model.modules())
        self.no_grad = torch.no_grad if fp8 else torch.inference_mode
        if self.device.type == "cpu":
            apply_cpu_inference(model)

    @property
    def has_mtp(self) -> bool:
        return len(self.model.mtp) > 0

    def prefill(self, slot: int, prompts: list[list[int]]) -> PrefillResult:
        """Write the prompts into slots slot.. (positions 0..len-1) and return their last logits."""
        n = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        P = int(lengths.max())
        ids = torch.zeros(n, P, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        view = self.cache.prefill_view(slot, n, P)
        with self.no_grad():
            # the head runs only at the distinct last positions (one column when the lengths are equal)
            keep = torch.unique(lengths - 1)  # sorted
            out = self.model(ids, cache=view, with_mtp=False, logits_to_keep=keep)
            col = torch.searchsorted(keep, lengths - 1)
            last = out.logits[torch.arange(n, device=self.device), col]
        for b, p in enumerate(prompts):
            self.cache.lengths[slot + b] = len(p)
        return PrefillResult(last.float(), out.hidden, ids, lengths)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states [..., D] -> logits [..., V] fp32 (the model's head)."""
        with self.no_grad():
            return self.model.head(hidden).float()

    def mtp_prefill(self, slot: int, pre: PrefillResult, next_tokens: torch.Tensor) -> torch.Tensor:
        """Fill the MTP cache layer over the prompts; next_tokens [n] are the tokens sampled after them.

        Position i gets (h_i, t_{i+1}); the last prompt position gets the sampled token. Returns the
        draft logits [n, 1, V] for the token after next_tokens."""
        n, P = pre.ids.shape
        rows = torch.arange(n, device=self.device)
        nxt = torch.cat([pre.ids[:, 1:], pre.ids.new_zeros(n, 1)], dim=1)
        nxt[rows, pre.lengths - 1] = next_tokens.to(self.device)
        positions = torch.arange(P, device=self.device).expand(n, P)
        view = self.cache.prefill_view(slot, n, P)
        return self._mtp(pre.hidden, nxt, positions, view, pre.lengths - 1).unsqueeze(1)

    def decode(self, tokens: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [n, S] for slots 0..n-1 at positions starts[b] + s -> (logits [n, S, V] fp32, hidden).

        The cache lengths are not advanced here: the caller commits what it keeps."""
        n, S = tokens.shape
        view = self.cache.decode_view(n, starts, S)
        with self.no_grad():
            out = self.model(tokens.to(self.device), positions=view.positions, cache=view, with_mtp=False)
            return out.logits.float(), out.hidden

    def mtp_decode(
        self, hidden: torch.Tensor, next_tokens: torch.Tensor, starts: torch.Tensor, last: torch.Tensor
    ) -> torch.Tensor:
        """MTP over the positions just decoded: hidden [n, S, D] (h_i), next_tokens [n, S] (t_{i+1}).

        All S positions enter the MTP cache layer; only position last[b] of row b (its last committed
        token) goes through the head: returns draft logits [n, V] fp32 for the token after it."""
        n, S = next_tokens.shape
        view = self.cache.decode_view(n, starts, S)
        return self._mtp(hidden, next_tokens.to(self.device), view.positions, view, last.to(self.device))

    def _mtp(
        self,
        h: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        view: CacheView,
        last: torch.Tensor,
    ) -> torch.Tensor:
        """MTP depth 1 (`MTPModule.combine`, its block, `MTPModule.logits`), computing only what the next
        draft needs.

        Every position's latent goes into the MTP cache layer (later drafts attend to it), but the rest of
        the block (query, attention, MoE) and the head run for position last[b] of each row only: the other
        positions' outputs would be thrown away. Same numbers for that row as the full step."""
        model = self.model
        module = model.mtp[0]
        block = module.block
        n = h.shape[0]
        rows = torch.arange(n, device=h.device)
        with self.no_grad():
            cos, sin = model.rope(positions, h.dtype)
            x = module.combine(h, model.embed(next_ids))
            c, pe = block.attn.latent(block.attn_norm(x), cos, sin)
            c_all, pe_all = view.update(block.layer_id, c, pe)
            T = c_all.shape[1]
            if view.mask is None:  # prefill: causal over the prompt
                mask = torch.arange(T, device=h.device)[None, :] <= last[:, None]
            else:
                mask = view.mask[rows, last]
            context = _Written(c_all, pe_all, mask.unsqueeze(1))
            x_last = x[rows, last].unsqueeze(1)  # [n, 1, D]
            y, _ = block(x_last, cos[rows, last].unsqueeze(1), sin[rows, last].unsqueeze(1), context)
            return module.logits(y[:, 0], model.head).float()


class _Written:
    """Cache protocol over latents already written: the block's own update for its one query row is
    the latent `_mtp` just wrote, so it is dropped and the whole context returned."""

    absorb = True

    def __init__(self, c: torch.Tensor, pe: torch.Tensor, mask: torch.Tensor):
        self.c, self.pe, self.mask = c, pe, mask

    def update(self, layer_id: int, c: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.c, self.pe

    def score_bias(self, heads: int, dtype: torch.dtype) -> torch.Tensor:
        n, S, T = self.mask.shape
        return score_bias(self.mask, n, S, heads, T, dtype, self.c.device)
