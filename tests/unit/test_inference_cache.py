"""The static latent KV cache: size per token by formula, writes, masks, compaction."""

import torch

from dsv3.config import ModelConfig
from dsv3.inference.cache import LatentKVCache, kv_cache_bytes_per_token


def test_bytes_per_token_formula():
    v3 = ModelConfig.from_preset("deepseek-v3-671b")
    assert kv_cache_bytes_per_token(v3, torch.bfloat16) == 61 * (512 + 64) * 2 == 70_272
    assert kv_cache_bytes_per_token(v3, torch.bfloat16, include_mtp=True) == 62 * 576 * 2
    tiny = ModelConfig.from_preset("tiny")
    assert kv_cache_bytes_per_token(tiny, torch.float32) == 4 * (64 + 16) * 4 == 1280
    assert kv_cache_bytes_per_token(tiny, torch.bfloat16) == 640
    cache = LatentKVCache(tiny, max_batch_size=2, max_seq_len=8, dtype=torch.bfloat16)
    assert cache.bytes_per_token == kv_cache_bytes_per_token(tiny, torch.bfloat16, include_mtp=True) == 800
    assert cache.nbytes == cache.bytes_per_token * 2 * 8


def test_views_write_positions_and_mask():
    cfg = ModelConfig.from_preset("debug")
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    cache = LatentKVCache(cfg, max_batch_size=3, max_seq_len=10)
    pre = cache.prefill_view(0, 2, 4)
    c, pe = torch.randn(2, 4, C), torch.randn(2, 4, R)
    assert pre.update(1, c, pe)[0] is c and pre.mask is None and not pre.absorb
    assert torch.equal(cache.c[1, :2, :4], c) and torch.equal(cache.pe[1, :2, :4], pe)
    cache.lengths[:2] = [4, 2]
    starts = torch.tensor([4, 2])
    view = cache.decode_view(2, starts, 2)
    c2, pe2 = torch.randn(2, 2, C), torch.randn(2, 2, R)
    c_all, pe_all = view.update(1, c2, pe2)
    assert view.absorb and c_all.shape == (2, 6, C) and pe_all.shape == (2, 6, R)
    assert torch.equal(c_all[0, 4:6], c2[0]) and torch.equal(c_all[1, 2:4], c2[1])
    assert torch.equal(c_all[0, :4], c[0]) and torch.equal(c_all[1, :2], c[1, :2])
    expected = torch.tensor(
        [[[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]], dtype=torch.bool
    )
    assert torch.equal(view.mask, expected)
    cache.lengths[0] = 6
    cache.move(0, 2)
    assert cache.lengths == [0, 2, 6] and torch.equal(cache.c[:, 2, :6], cache.c[:, 0, :6])


def test_bad_views_raise():
    import pytest

    cache = LatentKVCache(ModelConfig.from_preset("debug"), max_batch_size=2, max_seq_len=4)
    with pytest.raises(ValueError, match="slots"):
        cache.decode_view(3, torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.decode_view(1, torch.tensor([4]), 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.prefill_view(0, 1, 5)
