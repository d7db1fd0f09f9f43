"""Static, preallocated latent KV cache for MLA.

Absorbed MLA attends over the compressed latent itself, so per token and per layer the cache holds only
c = kv_norm(c_kv) (kv_lora_rank values) and the roped, head-shared k_pe (qk_rope_head_dim values):
576 values for DeepSeek-V3, i.e. 61 * 576 * 2 = 70,272 bytes per token in BF16, where a naive cache of
per-head keys and values would hold 61 * 128 * (192 + 128) * 2 = 4,997,120.

Storage is one tensor kv [layers, slots, max_seq_len, C + R] holding [c; pe] per position (`c` and `pe`
are views of its two column ranges), one slot per running sequence, plus one length per slot (the number
of valid positions). Keeping c and pe side by side lets a decode step write a token's latent with one
copy. Layers are indexed by the model's layer_id: the main layers 0..L-1, then one layer per MTP module
(L + k - 1), which the speculative decoder fills. Rolling back rejected draft tokens is just lowering a
length: positions past it are masked out and overwritten later.

Running sequences always occupy slots 0..n-1 (`move` compacts when one leaves), so a decode step reads
`c[layer, :n, :T]` as a view, with no gather. A forward pass gets a `CacheView`, which implements the
model's cache protocol (`update`, `mask`, `absorb`; see dsv3.model.mla).
"""

from __future__ import annotations

import torch

from dsv3.config import ModelConfig
from dsv3.model.mla import score_bias


def kv_cache_bytes_per_token(
    config: ModelConfig, dtype: torch.dtype = torch.bfloat16, include_mtp: bool = False
) -> int:
    """Bytes the latent cache needs per token: layers * (kv_lora_rank + qk_rope_head_dim) * dtype size.

    The paper's figure counts the main layers only (70,272 for the 671B model in BF16); the MTP layers
    the speculative decoder also caches are added with include_mtp."""
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if include_mtp else 0)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return layers * config.kv_cache_values_per_token * itemsize


class LatentKVCache:
    """Preallocated [layers, max_batch_size, max_seq_len, C | R] latent cache with per-slot lengths."""

    def __init__(
        self,
        config: ModelConfig,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        num_layers: int | None = None,
    ):
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.num_layers = (
            config.num_hidden_layers + config.num_nextn_predict_layers if num_layers is None else num_layers
        )
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.kv_lora_rank = config.kv_lora_rank
        self.rope_dim = config.qk_rope_head_dim
        shape = (self.num_layers, max_batch_size, max_seq_len, self.kv_lora_rank + self.rope_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.c = self.kv[..., : self.kv_lora_rank]  # views: [layers, slots, max_seq_len, C] and [.., R]
        self.pe = self.kv[..., self.kv_lora_rank :]
        self.lengths = [0] * max_batch_size  # valid positions per slot (host ints)
        # 0, 1, 2, ...: positions and slot numbers, sliced by every decode view
        self.arange = torch.arange(max(max_seq_len, max_batch_size), device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.c.dtype

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all cached layers (main + MTP)."""
        return self.num_layers * (self.kv_lora_rank + self.rope_dim) * self.c.element_size()

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's valid positions into slot dst (compaction when a sequence leaves)."""
        n = self.lengths[src]
        if src != dst and n:
            self.kv[:, dst, :n] = self.kv[:, src, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0

    def prefill_view(self, slot: int, n: int, seq_len: int) -> CacheView:
        """A view writing positions 0..seq_len-1 of slots slot..slot+n-1 (naive attention, causal)."""
        self._check_rows(slot, n)
        if seq_len > self.max_seq_len:
            raise ValueError(f"{seq_len} positions do not fit a cache of max_seq_len={self.max_seq_len}")
        return CacheView(self, slot, n, None, seq_len, absorb=False)

    def decode_view(self, n: int, starts: torch.Tensor, num_new: int) -> CacheView:
        """A view appending num_new tokens to slots 0..n-1 at positions starts[b].. (absorbed attention)."""
        self._check_rows(0, n)
        return CacheView(self, 0, n, starts, num_new, absorb=True)

    def _check_rows(self, slot: int, n: int) -> None:
        if n <= 0 or slot < 0 or slot + n > self.max_batch_size:
            raise ValueError(f"slots {slot}..{slot + n - 1} are outside 0..{self.max_batch_size - 1}")


class CacheView:
    """One forward pass's window on the cache: the model calls `update(layer_id, c, pe)` once per layer.

    Prefill (starts None): c, pe [n, S, .] are written at positions 0..S-1 and returned as they are
    (causal attention over the prompt; right padding never reaches a real token's causal window).
    Decode: row b writes S new positions from starts[b]; returned are positions 0..T-1 with
    T = max(starts) + S, and `mask` [n, S, T] lets new token s of row b see positions <= starts[b] + s."""

    def __init__(
        self,
        cache: LatentKVCache,
        slot: int,
        n: int,
        starts: torch.Tensor | None,
        num_new: int,
        absorb: bool,
    ):
        self.cache = cache
        self.slot, self.n, self.num_new = slot, n, num_new
        self.absorb = absorb
        self.positions: torch.Tensor | None = None  # [n, S] positions of the new tokens (decode)
        self._mask: torch.Tensor | None = None
        self._bias: dict = {}
        if starts is None:
            self.length = num_new
            return
        first = starts.tolist()  # host ints: no reduction kernel per step
        self.length = max(first) + num_new
        self._aligned = min(first) == max(first)  # every row at the same position: plain causal
        if self.length > cache.max_seq_len:
            raise ValueError(
                f"position {self.length - 1} is past the cache's max_seq_len={cache.max_seq_len}"
            )
        ar = cache.arange
        self.positions = starts.to(ar.device)[:, None] + ar[:num_new]  # [n, S]
        # row of each new token in kv[layer] seen as [slots * max_seq_len, C + R]
        self._flat = (self.positions + ar[slot : slot + n, None] * cache.max_seq_len).view(-1)

    @property
    def mask(self) -> torch.Tensor | None:
        """[n, S, T] bool, True where new token s of row b may attend (decode; None at prefill)."""
        if self._mask is None and self.positions is not None:
            self._mask = self.cache.arange[: self.length] <= self.positions[:, :, None]
        return self._mask

    def score_bias(self, heads: int, dtype: torch.dtype) -> torch.Tensor:
        """`mask` as the absorbed attention's additive bias [n, S*heads, T], built once per forward
        (rows at one position, as always at batch 1, take the plain causal bias without the mask)."""
        key = (heads, dtype)
        if key not in self._bias:
            mask = None if self._aligned else self.mask
            n, S, T = self.n, self.num_new, self.length
            self._bias[key] = score_bias(mask, n, S, heads, T, dtype, self.cache.kv.device)
        return self._bias[key]

    def update(self, layer_id: int, c: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache, lo, hi = self.cache, self.slot, self.slot + self.n
        if self.positions is None:  # prefill: contiguous write at 0..S-1
            S = c.shape[1]
            cache.c[layer_id, lo:hi, :S] = c
            cache.pe[layer_id, lo:hi, :S] = pe
            return c, pe
        kv = cache.kv[layer_id]
        new = torch.cat([c, pe], dim=-1)  # [n, S, C+R]: one copy into the cache instead of two
        if new.dtype != kv.dtype:  # a cache in another dtype than the activations
            new = new.to(kv.dtype)
        kv.view(-1, kv.shape[-1]).index_copy_(0, self._flat, new.view(-1, kv.shape[-1]))
        c_all, pe_all = kv[lo:hi, : self.length].split_with_sizes([cache.kv_lora_rank, cache.rope_dim], -1)
        return c_all, pe_all
