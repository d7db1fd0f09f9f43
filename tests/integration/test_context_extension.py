"""Long-context extension (`dsv3 train --from RUN --extend-context F`) on the debug preset: the stage's
configs (YaRN over the source's training length, constant LR, tokens per step kept), a short stage and a
chained second one, and the exported model read identically by dsv3 and transformers at the extended
length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv3.checkpoint import from_pretrained
from dsv3.checkpoint.hf import read_hf_config
from dsv3.cli import main
from dsv3.config import ModelConfig
from dsv3.tasks import get_task
from dsv3.tasks.distill import write_jsonl
from dsv3.tokenizer import Tokenizer
from dsv3.train.data import bundled_corpus_path
from dsv3.train.extend import extension, yarn_model
from dsv3.train.metrics import read_metrics

FAST = ["batch_size=4", "eval_batches=1", "sample_tokens=0", "eval_every=0", "ckpt_every=0"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A debug-preset run trained at 32 tokens."""
    root = tmp_path_factory.mktemp("ext")
    corpus = root / "shakespeare.txt"
    corpus.write_text(bundled_corpus_path().read_text()[:40_000])
    out = root / "src"
    argv = ["train", "--preset", "debug", "--data", str(corpus), "--out", str(out), "--no-progress"]
    assert main([*argv, "--steps", "6", "seq_len=32", *FAST]) == 0
    return out


def test_yarn_model_sets_and_chains_the_scaling():
    base = ModelConfig.from_preset("debug")
    one = yarn_model(base, 64, 4)
    rs = one.rope_scaling
    assert rs["type"] == "yarn" and rs["factor"] == 4.0 and rs["original_max_position_embeddings"] == 64
    assert (rs["beta_fast"], rs["beta_slow"], rs["mscale"], rs["mscale_all_dim"]) == (32, 1, 1.0, 1.0)
    assert one.max_position_embeddings == 256
    two = yarn_model(one, 256, 4)  # a second stage: same original length, factors multiply
    assert two.rope_scaling["factor"] == 16.0 and two.rope_scaling["original_max_position_embeddings"] == 64
    assert two.max_position_embeddings == 1024
    with pytest.raises(ValueError, match="must be > 1"):
        yarn_model(base, 64, 1.0)
    # beta_fast chosen for a short training length, kept by a chained stage unless set again
    local = yarn_model(base, 64, 4, beta_fast=4)
    assert (local.rope_scaling["beta_fast"], local.rope_scaling["beta_slow"]) == (4, 1)
    assert yarn_model(local, 256, 4).rope_scaling["beta_fast"] == 4
    assert yarn_model(local, 256, 4, beta_fast=8).rope_scaling["beta_fast"] == 8
    with pytest.raises(ValueError, match="beta_slow <= beta_fast"):
        yarn_model(base, 64, 4, beta_fast=0.5)


def test_stage_configs_follow_the_source(source):
    info = json.loads((source / "train_config.json").read_text())["train"]
    ext = extension(source, 4)
    t = ext.train
    assert t.seq_len == 128 and ext.model.max_position_embeddings == 128
    assert ext.model.rope_scaling["original_max_position_embeddings"] == 32
    assert t.batch_size == max(1, info["batch_size"] * 32 // 128)  # tokens per step kept
    last = [r for r in read_metrics(source) if r["type"] == "train"][-1]
    assert t.lr == pytest.approx(last["lr"])  # constant at the LR the source ended with
    assert t.mtp_weight == pytest.approx(last["mtp_weight"])
    assert t.steps == 1  # 10% of 6 steps, rounded
    assert t.init_from == str(source / "model")
    with pytest.raises(ValueError, match="longer than the extended context"):
        extension(source, 4, seq_len=256)


def test_a_stage_from_an_sft_run(source, tmp_path):
    """Needle SFT at the training length, then the stage (the benchmark's order): the stage runs at the
    LR the SFT ended with (its cosine's last value), trains no MTP, and keeps the SFT's 32-token length as
    YaRN's original length."""
    data, sft = tmp_path / "raw.jsonl", tmp_path / "sft"
    write_jsonl(data, get_task("add:digits=1").sft_records(40, chat=False))
    argv = ["sft", "--from", str(source), "--data", str(data), "--out", str(sft), "--steps", "3"]
    assert main([*argv, "--no-progress", "seq_len=32", "lr=1e-3", "batch_size=2"]) == 0
    train = [r for r in read_metrics(sft) if r["type"] == "train"]
    assert all(r["mtp_weight"] == 0 for r in train)  # SFT trains no MTP, through its last step
    ext = extension(sft, 4)
    assert ext.model.rope_scaling["original_max_position_embeddings"] == 32 and ext.train.seq_len == 128
    assert ext.train.lr == pytest.approx(train[-1]["lr"]) and ext.train.mtp_weight == 0


def test_two_stages_and_transformers_parity_at_the_extended_length(source, tmp_path):
    transformers = pytest.importorskip("transformers")
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    common = ["--no-progress", *FAST[1:]]
    assert (
        main(
            [
                "train",
                "--from",
                str(source),
                "--extend-context",
                "4",
                "--steps",
                "3",
                "--out",
                str(s1),
                *common,
            ]
        )
        == 0
    )
    train = [r for r in read_metrics(s1) if r["type"] == "train"]
    assert len(train) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert len({r["lr"] for r in train}) == 1  # constant LR
    cfg1 = read_hf_config(s1 / "model")
    assert cfg1["rope_scaling"]["factor"] == 4.0 and cfg1["max_position_embeddings"] == 128
    # the stage started from the source's weights: its embedding moved only a little from them
    src_w = from_pretrained(source / "model").embed.weight
    s1_model = from_pretrained(s1 / "model")
    assert (s1_model.embed.weight - src_w).abs().max() < 0.05

    # second stage chained on the first: factor 16 over the original 32 tokens, trained at 256 (seq-len 256)
    assert (
        main(["train", "--from", str(s1), "--extend-context", "4", "--steps", "2", "--out", str(s2), *common])
        == 0
    )
    cfg2 = read_hf_config(s2 / "model")
    rs = cfg2["rope_scaling"]
    assert rs["factor"] == 16.0 and rs["original_max_position_embeddings"] == 32
    assert cfg2["max_position_embeddings"] == 512
    assert json.loads((s2 / "train_config.json").read_text())["train"]["seq_len"] == 512

    ours = from_pretrained(s2 / "model", dtype=torch.float32).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(s2 / "model", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert a.abs().max() > 0.5
    assert (a - b).abs().max().item() <= 2e-4


def test_extension_options_are_checked(source, tmp_path):
    bad_beta = ["--yarn-beta-fast", "4", "--out", str(tmp_path / "b"), "--no-progress"]
    assert main(["train", "--preset", "debug", *bad_beta]) == 2  # goes with --extend-context
    assert main(["train", "--from", str(source), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert main(["train", "--preset", "debug", "--seq-len", "64", "--out", str(tmp_path / "y")]) == 2
    assert (
        main(["train", "--from", str(tmp_path), "--extend-context", "2", "--out", str(tmp_path / "z")]) == 2
    )


def test_attention_split_of_the_benchmark(source, load_benchmark):
    """The benchmark's probe of where retrieval looks: a mass in [0, 1] per layer and depth, the model's own
    attention cores put back, and the score split real (no rotary queries -> no rope part)."""
    bench = load_benchmark("context_extension")
    model = from_pretrained(source / "model", dtype=torch.float32).eval()
    tok = Tokenizer.from_file(source / "model")
    cores = [layer.attn.attention for layer in model.layers]
    rows = bench.attention_split(model, tok, 200, n=1)
    assert [r["depth"] for r in rows] == list(bench.DEPTHS)
    assert all(len(r["needle_mass"]) == len(model.layers) for r in rows)
    assert all(0 <= m <= 1 for r in rows for m in r["needle_mass"])
    assert all(r["nope_abs"] > 0 and r["rope_abs"] > 0 for r in rows)
    assert [layer.attn.attention for layer in model.layers] == cores
    with torch.no_grad():
        for layer in model.layers:  # zero the rotary rows of every head's query
            a = layer.attn
            w = a.wq_b.weight.view(a.n_heads, a.qk_head_dim, -1)
            w[:, a.qk_nope_head_dim :] = 0
    rows = bench.attention_split(model, tok, 200, n=1)
    assert all(r["rope_abs"] == 0 and r["nope_abs"] > 0 for r in rows)
