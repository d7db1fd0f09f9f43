"""Data: corpus formats, the deterministic split, packing with next-token labels, the resumable order,
data-parallel sharding, PSM Fill-in-the-Middle and the bigram baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dsv3.train.data import (
    PackedDataset,
    bigram_bpb,
    bundled_corpus_path,
    eval_windows,
    fim_permute,
    load_corpus,
    split_train_val,
)

BOS, EOS, FB, FH, FE = 0, 1, 3, 4, 5


def test_corpus_formats(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert load_corpus(tmp_path) == ["first", "second"]  # sorted paths
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}) + "\n")
    assert load_corpus(jl) == ["x", "y"]
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="d.jsonl:1"):
        load_corpus(bad)
    with pytest.raises(ValueError, match="not found"):
        load_corpus(tmp_path / "missing.txt")
    assert load_corpus(None)[0].startswith("First Citizen")


def test_split_is_nanogpt_last_10_percent():
    text = bundled_corpus_path().read_text()
    train, val = split_train_val([text], 0.1)
    n = int(len(text) * 0.9)
    assert train == [text[:n]] and val == [text[n:]]
    train, val = split_train_val(["aaaa", "bbbb", "cc"], 0.5)  # the cut falls inside a document
    assert train == ["aaaa", "b"] and val == ["bbb", "cc"]


def test_packing_windows_and_labels():
    tokens = np.arange(100, 200, dtype=np.int32)
    ds = PackedDataset(tokens, seq_len=8, seed=3)
    x, y = ds.next_batch(4)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # labels are the next tokens
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 7, dtype=torch.int64))  # contiguous windows


def test_epoch_covers_every_window_once_and_order_is_seeded():
    tokens = np.arange(1000, dtype=np.int32)
    ds = PackedDataset(tokens, seq_len=10, seed=1)
    starts = ds.epoch_starts(0)
    offset = int(starts.min())
    assert sorted(starts.tolist()) == list(range(offset, offset + 10 * len(starts), 10))
    assert len(starts) == (1000 - 1 - offset) // 10
    assert not np.array_equal(starts, ds.epoch_starts(1))
    assert np.array_equal(starts, PackedDataset(tokens, seq_len=10, seed=1).epoch_starts(0))
    assert not np.array_equal(starts, PackedDataset(tokens, seq_len=10, seed=2).epoch_starts(0))


def test_resume_continues_exactly_across_epochs():
    tokens = np.arange(300, dtype=np.int32)
    a = PackedDataset(tokens, seq_len=10, seed=5, fim_rate=0.5, fim_ids=(FB, FH, FE))
    full = [a.next_batch(7)[0] for _ in range(12)]  # ~3 epochs
    b = PackedDataset(tokens, seq_len=10, seed=5, fim_rate=0.5, fim_ids=(FB, FH, FE))
    first = [b.next_batch(7)[0] for _ in range(5)]
    state = b.state_dict()
    c = PackedDataset(tokens, seq_len=10, seed=5, fim_rate=0.5, fim_ids=(FB, FH, FE))
    c.load_state_dict(state)
    rest = [c.next_batch(7)[0] for _ in range(7)]
    assert all(torch.equal(p, q) for p, q in zip(full, first + rest))
    assert a.state.epoch >= 2  # the run crossed epoch boundaries


def test_data_parallel_shards_partition_the_global_batch():
    tokens = np.arange(500, dtype=np.int32)
    whole = PackedDataset(tokens, 10, seed=0).next_batch(6)[0]
    parts = [PackedDataset(tokens, 10, seed=0).next_batch(6, rank=r, world=3)[0] for r in range(3)]
    assert torch.equal(torch.stack(parts, 1).reshape(6, 10), whole)
    with pytest.raises(ValueError, match="divisible"):
        PackedDataset(tokens, 10).next_batch(5, 0, 2)


def test_fim_psm_form():
    rng = np.random.default_rng(0)
    doc = np.array([BOS, 10, 11, 12, 13, 14, 15, EOS], dtype=np.int64)
    out = fim_permute(doc, rng, 1.0, (FB, FH, FE), BOS, EOS)
    # [BOS] <fim_begin> prefix <fim_hole> suffix <fim_end> middle [EOS], cut back to the window length
    assert len(out) == len(doc) and out[0] == BOS and out[1] == FB
    full = fim_permute(
        np.concatenate([doc, [20, 21, 22]]), np.random.default_rng(0), 1.0, (FB, FH, FE), BOS, EOS
    )
    body = list(full[: len(doc) + 3])
    h, e = body.index(FH), body.index(FE)
    prefix, suffix, middle = body[2:h], body[h + 1 : e], body[e + 1 : -1]
    assert body[-1] == EOS
    assert prefix + middle + suffix == [10, 11, 12, 13, 14, 15]
    assert fim_permute(doc, rng, 0.0, (FB, FH, FE), BOS, EOS) is doc  # rate 0: untouched


def test_fim_rate_is_respected_per_document():
    rng = np.random.default_rng(1)
    doc = np.array([BOS, *range(10, 40), EOS], dtype=np.int64)
    hits = sum(FB in fim_permute(doc, rng, 0.1, (FB, FH, FE), BOS, EOS) for _ in range(2000))
    assert 140 < hits < 260  # ~10%
    two = np.concatenate([doc, doc])
    out = fim_permute(two, np.random.default_rng(2), 1.0, (FB, FH, FE), BOS, EOS)
    assert (out == FB).sum() == 2 and len(out) == len(two)  # each piece transformed, the tail cut
    assert out[0] == BOS and out[1] == FB


def test_eval_windows_and_too_small_data():
    w = eval_windows(np.arange(25), 8)
    assert w.shape == (3, 9) and w[1, 0] == 8 and w[2, -1] == 24
    with pytest.raises(ValueError, match="too few"):
        PackedDataset(np.arange(10), seq_len=8)


def test_bigram_bpb():
    text = "ab" * 500
    assert bigram_bpb(text, text[:100]) < 0.1  # perfectly predictable
    assert bigram_bpb("abcd" * 100, "dcba" * 10) > 5  # unseen pairs cost many bits
