"""Long-context extension on the tiny preset: trained at 256 tokens, extended with YaRN to 4x (and 16x).

Steps (each through the CLI a user runs):
1. `dsv3 train --preset tiny --steps N` at seq_len 256 on tinyshakespeare (its first 90%) mixed with
   passkey documents (`dsv3.tasks.passkey`: a 5-digit key in filler, then the question and the answer),
   sized to fit 256 tokens;
2. with --sft-steps N: `dsv3 sft --from RUN` at 256 tokens on passkey prompt/completion records (the
   loss on the key only) mixed with text records, the needle samples from which the tiny model learns
   retrieval (the pre-training mix alone does not teach it at this budget, BENCHMARKS.md); the SFT run
   is then the stage's source; with --long-sft-steps N a second needle SFT at 1024 tokens follows the
   stage, and its model is the one whose retrieval is reported after the stage;
3. `dsv3 train --from RUN --extend-context 4 [--yarn-beta-fast B]` (one stage, dsv3.train.extend) on
   the pre-training text mixed with passkey documents of up to 1024 tokens; with --x16 a second stage
   chained on it (x4 again);
4. bits per byte on the held-out last 10% of tinyshakespeare, by target position bucket (0-256, 256-1024,
   1024-4096) over windows of the extended length: the source model with plain RoPE (extrapolating), the
   source weights under the stage's YaRN config without training, and the stage's model;
5. passkey retrieval accuracy by length (tokens) x depth, greedy, raw prompts (`passkey_sweep`), before
   and after the stage: a heatmap PNG (the report's Figure 8 shape).
6. where retrieval looks (`attention_split`): for the model scored after the stage, at 1024 tokens, the
   attention mass each layer puts on the needle and the size of MLA's content (nope) and rotary (rope)
   score parts, by the needle's distance from the question.

    python benchmarks/context_extension.py [--steps 700] [--sft-steps 0] [--stage-steps 40] [--x16]
        [--yarn-beta-fast 32] [--long-sft-steps 0 --long-sft-lr 1e-3 --long-sft-batch 4 --long-sft-full 0]

The retrieval recipe of BENCHMARKS.md: --sft-steps 1000 --yarn-beta-fast 4 --stage-steps 150
--long-sft-steps 700 --long-sft-lr 5e-4 --long-sft-batch 8 --long-sft-full 0.75.

Last line: JSON {bpb_native, bpb_4x_before, bpb_4x_after, bpb_4x_yarn_untrained, needle_4x, seconds, ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv3 import Transformer
from dsv3.checkpoint import from_pretrained
from dsv3.checkpoint.hf import read_hf_config
from dsv3.cli import main as dsv3
from dsv3.config import ModelConfig
from dsv3.inference import LLM
from dsv3.tasks.passkey import PasskeyTask, chars_for_tokens, needle, passkey_sweep
from dsv3.tokenizer import Tokenizer
from dsv3.train.data import bundled_corpus_path
from dsv3.train.extend import yarn_model

BUCKETS = ((0, 256), (256, 1024), (1024, 4096))
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def needle_sft(
    path: Path,
    text: str,
    tok: Tokenizer,
    needles: int,
    texts: int,
    seed: int,
    tokens: int = 256,
    full: float = 0.0,
) -> None:
    """SFT JSONL: `needles` raw passkey prompt/completion records (TRL's format, the loss on " KEY") whose
    prompts take up to `tokens` - 6 tokens, at uniform depths, and `texts` 400-character text records (the
    loss on every token) from `text`, shuffled. A fraction `full` of the prompts take the whole window and
    the rest a uniform length: with uniform lengths, a needle's distance from the question is the product
    of two uniforms, so far needles are rare (4% beyond 3/4 of the window; 20% with full = 0.75)."""
    rng = random.Random(seed)
    least = 200  # characters: the needle, the question and a little filler
    longest = max(least, chars_for_tokens(tok, tokens - 6))
    recs = []
    for i in range(needles):
        chars = longest if rng.random() < full else rng.randint(least, longest)
        task = PasskeyTask(length=chars, depth=rng.random())
        recs += task.sft_records(1, seed=seed * 1_000_003 + i, chat=False)
    starts = rng.sample(range(0, len(text) - 400), texts)
    recs += [{"text": text[i : i + 400]} for i in starts]
    rng.shuffle(recs)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def run_needle_sft(
    src: Path,
    dst: Path,
    train_text: str,
    tokens: int,
    batch: int,
    steps: int,
    a: argparse.Namespace,
    lr: float = 1e-3,
    full: float = 0.0,
) -> float:
    """`dsv3 sft` from `src` to `dst` at `tokens` tokens on a fresh needle SFT file (`needle_sft`, seeded by
    the length); its wall-clock seconds."""
    t = time.perf_counter()
    data = dst.parent / f"needles{tokens}.jsonl"
    tok = Tokenizer.from_file(src / "model")
    needle_sft(data, train_text, tok, a.sft_needles, a.sft_texts, seed=tokens, tokens=tokens, full=full)
    rc = dsv3(["sft", "--from", str(src), "--data", str(data), "--out", str(dst), "--steps", str(steps),
               f"seq_len={tokens}", f"batch_size={batch}", f"lr={lr}", "val_frac=0.01", "--no-progress",
               "--overwrite"])  # fmt: skip
    assert rc == 0, f"the needle SFT at {tokens} tokens failed"
    return time.perf_counter() - t


def corpus(path: Path, text: str, needle_tokens: int, needles: int, seed: int) -> None:
    """JSONL: the text in ~2000-character documents plus `needles` passkey documents (prompt + answer)
    whose prompts take up to ~`needle_tokens` tokens at ~2 characters per token, shuffled."""
    docs = [text[i : i + 2000] for i in range(0, len(text), 2000)]
    rng = random.Random(seed)
    for _ in range(needles):
        chars = rng.randint(200, max(201, int(needle_tokens * 2.2)))
        task = PasskeyTask(length=chars, depth=rng.random())
        p = task.sample(rng, "train")
        docs.append(f"{p.prompt} {p.answer}.")
    rng.shuffle(docs)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


@torch.no_grad()
def bpb_by_bucket(
    model: Transformer, tok: Tokenizer, text: str, length: int, windows: int
) -> dict[str, float]:
    """Bits per byte of each target-position bucket over `windows` windows of `length` tokens."""
    ids = tok.encode(text)
    nbytes = torch.tensor([len(tok.decode_bytes([i])) for i in range(tok.vocab_size)], dtype=torch.float64)
    nats = torch.zeros(length, dtype=torch.float64)
    byts = torch.zeros(length, dtype=torch.float64)
    step = max(length, (len(ids) - length - 1) // windows)
    for w in range(windows):
        seq = torch.tensor(ids[w * step : w * step + length + 1])
        if len(seq) < length + 1:
            break
        logits = model(seq[None, :-1]).logits[0].float()
        nats += F.cross_entropy(logits, seq[1:], reduction="none").double()
        byts += nbytes[seq[1:]]
    out = {}
    for lo, hi in BUCKETS:
        if lo < length:
            out[f"{lo}-{hi}"] = float(nats[lo:hi].sum() / byts[lo:hi].sum() / math.log(2))
    return out


def load_as(model_dir: Path, config: ModelConfig) -> Transformer:
    """The weights of `model_dir` in a model built from `config` (e.g. the same weights under YaRN)."""
    model = Transformer(config)
    model.load_state_dict(from_pretrained(model_dir, dtype=torch.float32).state_dict())
    return model.eval()


def needle_grid(model: Transformer, tok: Tokenizer, lengths: list[int], n: int) -> list[dict]:
    llm = LLM(model, tokenizer=tok, max_seq_len=max(lengths) + 16, max_batch_size=16, dtype="float32")
    return passkey_sweep(llm, lengths, DEPTHS, n=n)


@torch.no_grad()
def attention_split(model: Transformer, tok: Tokenizer, length: int, n: int = 4) -> list[dict]:
    """Where the query that predicts the key's first digit looks, for needles at each depth of `length`-
    token prompts: per layer, the largest attention mass any head puts on the needle, and the mean |score|
    of the query's row split into MLA's two parts, q_nope . k_nope (content only) and q_pe . k_pe (the
    rotated part, which carries position), both times the softmax scale. A recording core is set as each
    layer's `attn.attention` (the seam speed paths use) and the model's own cores are put back after."""
    saved = [layer.attn.attention for layer in model.layers]
    rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    q_at: list[int] = [0]

    def recorder(i: int, dn: int):
        def core(q, k, v, mask, scale):  # noqa: ANN001, ANN202 (the AttentionFn contract)
            qi = q[:, q_at[0]].float()  # [B, H, D]
            nope = torch.einsum("bhd,bthd->bht", qi[..., :dn], k[..., :dn].float()) * scale
            rope = torch.einsum("bhd,bthd->bht", qi[..., dn:], k[..., dn:].float()) * scale
            keep = q_at[0] + 1
            rows[i] = ((nope + rope)[..., :keep].softmax(-1), nope[..., :keep], rope[..., :keep])
            return saved[i](q, k, v, mask, scale)

        return core

    for i, layer in enumerate(model.layers):
        layer.attn.attention = recorder(i, layer.attn.qk_nope_head_dim)
    out, rng = [], random.Random(7)
    chars = chars_for_tokens(tok, length - 6)
    try:
        for depth in DEPTHS:
            mass = torch.zeros(len(model.layers))
            nope_abs = rope_abs = 0.0
            for _ in range(n):
                p = PasskeyTask(length=chars, depth=depth).sample(rng, "test")
                ids = [tok.bos_id, *tok.encode(p.prompt)]
                start = 1 + len(tok.encode(p.prompt[: p.prompt.index(needle(p.answer))]))
                end = start + len(tok.encode(needle(p.answer)))
                answer = tok.encode(" " + p.answer)
                q_at[0] = len(ids)  # the " " token, whose output is the first digit
                model(torch.tensor([ids + answer]))
                for i, (prob, nope, rope) in rows.items():
                    mass[i] += prob[0, :, start:end].sum(-1).max().item() / n
                    nope_abs += nope.abs().mean().item()
                    rope_abs += rope.abs().mean().item()
            out.append({"depth": depth, "distance": round(length * (1 - depth)),
                        "needle_mass": [round(x, 2) for x in mass.tolist()],
                        "nope_abs": round(nope_abs / n / len(rows), 2),
                        "rope_abs": round(rope_abs / n / len(rows), 2)})  # fmt: skip
    finally:
        for layer, core in zip(model.layers, saved):
            layer.attn.attention = core
    return out


def heatmap(grids: dict[str, list[dict]], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(4.5 * len(grids), 3.6), squeeze=False)
    for ax, (title, grid) in zip(axes[0], grids.items()):
        acc = [
            [next(r["accuracy"] for r in grid if r["length"] == L and r["depth"] == d) for L in lengths]
            for d in DEPTHS
        ]
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(DEPTHS)), [f"{d:.0%}" for d in DEPTHS])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(title)
        for i, row in enumerate(acc):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="retrieval accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out/context_extension")
    ap.add_argument("--steps", type=int, default=700, help="pre-training steps at 256 tokens")
    ap.add_argument("--stage-steps", type=int, default=40, help="steps of each extension stage")
    ap.add_argument("--x16", action="store_true", help="a second stage to 16x (4096 tokens)")
    ap.add_argument("--needle-n", type=int, default=4, help="held-out keys per length x depth cell")
    ap.add_argument("--eval-windows", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--needles", type=int, default=3000, help="passkey docs per stage's data")
    ap.add_argument("--sft-steps", type=int, default=0, help="steps of a needle SFT before the stage")
    ap.add_argument("--yarn-beta-fast", type=float, default=None, help="YaRN beta_fast (default V3's 32)")
    ap.add_argument("--sft-needles", type=int, default=10000, help="passkey records of a needle SFT")
    ap.add_argument("--sft-texts", type=int, default=0, help="text records mixed into a needle SFT")
    ap.add_argument(
        "--long-sft-steps", type=int, default=0, help="steps of a needle SFT at 1024 tokens after the stage"
    )
    ap.add_argument("--long-sft-lr", type=float, default=1e-3, help="peak LR of the needle SFT at 1024")
    ap.add_argument("--long-sft-batch", type=int, default=4, help="rows of 1024 tokens per step")
    ap.add_argument(
        "--long-sft-full", type=float, default=0.0, help="fraction of its prompts that fill the window"
    )
    ap.add_argument(
        "--no-split-digits", dest="split_digits", action="store_false", help="BPE may merge digits"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = bundled_corpus_path().read_text()
    cut = int(len(text) * 0.9)
    train_text, held_out = text[:cut], text[cut:]
    corpus(out / "data256.jsonl", train_text, 256, a.needles, seed=0)
    corpus(out / "data1024.jsonl", train_text, 1024, a.needles, seed=1)
    quiet = ["--no-progress", "--no-sample", "--overwrite"]
    pre, s4, s16 = out / "native", out / "x4", out / "x16"
    # the run's tokenizer, placed before `dsv3 train` (which then uses it): digits split one by one, so a
    # key is copied as ten frequent tokens (see Tokenizer.train)
    shutil.rmtree(pre, ignore_errors=True)
    docs = [json.loads(line)["text"] for line in (out / "data256.jsonl").read_text().splitlines()]
    vocab = ModelConfig.from_preset("tiny").vocab_size
    Tokenizer.train(docs, vocab, split_digits=a.split_digits).save(pre / "tokenizer")
    t = time.perf_counter()
    rc = dsv3(["train", "--preset", "tiny", "--steps", str(a.steps), "--data", str(out / "data256.jsonl"),
               "--out", str(pre), *quiet[:2], "eval_every=0", "ckpt_every=0"])  # fmt: skip
    assert rc == 0, "pre-training failed"
    pretrain_s = time.perf_counter() - t
    # the needle SFT at the training length: the stage's source
    src, sft_s = pre, 0.0
    if a.sft_steps:
        src = out / "native_sft"
        sft_s = run_needle_sft(pre, src, train_text, 256, 16, a.sft_steps, a)
    t = time.perf_counter()
    beta = [] if a.yarn_beta_fast is None else ["--yarn-beta-fast", str(a.yarn_beta_fast)]
    rc = dsv3(["train", "--from", str(src), "--extend-context", "4", "--steps", str(a.stage_steps),
               "--data", str(out / "data1024.jsonl"), "--out", str(s4), *beta, *quiet])  # fmt: skip
    assert rc == 0, "the 4x stage failed"
    stage_s = time.perf_counter() - t
    final, long_sft_s = s4, 0.0  # the model whose retrieval is reported "after"
    if a.long_sft_steps:
        final = out / "x4_sft"
        long_sft_s = run_needle_sft(
            s4, final, train_text, 1024, a.long_sft_batch, a.long_sft_steps, a, a.long_sft_lr, a.long_sft_full
        )
    stage16_s = None
    if a.x16:
        t = time.perf_counter()
        rc = dsv3(["train", "--from", str(s4), "--extend-context", "4", "--steps", str(a.stage_steps),
                   "--data", str(out / "data1024.jsonl"), "--out", str(s16), *quiet])  # fmt: skip
        assert rc == 0, "the 16x stage failed"
        stage16_s = time.perf_counter() - t

    tok = Tokenizer.from_file(src / "model")
    src_cfg = ModelConfig.from_hf(read_hf_config(src / "model"))
    yarn4 = yarn_model(src_cfg, 256, 4, beta_fast=a.yarn_beta_fast)
    models = {
        "before (plain RoPE)": load_as(src / "model", src_cfg.replace(max_position_embeddings=4096)),
        "YaRN, no training": load_as(src / "model", yarn4),
        "after the 4x stage": from_pretrained(s4 / "model", dtype=torch.float32).eval(),
    }
    bpb = {k: bpb_by_bucket(m, tok, held_out, 1024, a.eval_windows) for k, m in models.items()}
    if a.x16:
        m16 = from_pretrained(s16 / "model", dtype=torch.float32).eval()
        bpb["after the 16x stage (4096)"] = bpb_by_bucket(
            m16, tok, held_out, 4096, max(2, a.eval_windows // 4)
        )
        bpb["before (plain RoPE, 4096)"] = bpb_by_bucket(
            models["before (plain RoPE)"], tok, held_out, 4096, max(2, a.eval_windows // 4)
        )
    for k, v in bpb.items():
        print(f"bpb {k:28s} " + "  ".join(f"{b}: {x:.3f}" for b, x in v.items()), flush=True)

    lengths = [256, 512, 1024]
    after_label = "after the 4x stage" + (" + needle SFT at 1024" if a.long_sft_steps else "")
    grids = {
        "before (plain RoPE)": needle_grid(models["before (plain RoPE)"], tok, lengths, a.needle_n),
        after_label: needle_grid(
            from_pretrained(final / "model", dtype=torch.float32).eval(), tok, lengths, a.needle_n
        ),
    }
    for k, g in grids.items():
        print(f"needle {k}: " + "  ".join(f"{r['length']}@{r['depth']:.2f}={r['accuracy']:.2f}" for r in g))
    heatmap(grids, lengths, out.with_suffix(".png"))
    split = attention_split(from_pretrained(final / "model", dtype=torch.float32).eval(), tok, 1024)
    for r in split:
        print(f"attention {after_label}, needle {r['distance']} tokens back: mass on the needle by layer "
              f"{r['needle_mass']}, mean |score| nope {r['nope_abs']} rope {r['rope_abs']}")  # fmt: skip

    def mean_acc(grid: list[dict], max_len: int) -> float:
        cells = [r["accuracy"] for r in grid if r["length"] <= max_len]
        return sum(cells) / len(cells)

    after, before = bpb["after the 4x stage"], bpb["before (plain RoPE)"]
    rec = {
        "bpb_native": round(after["0-256"], 4),
        "bpb_4x_before": round(before["256-1024"], 4),
        "bpb_4x_yarn_untrained": round(bpb["YaRN, no training"]["256-1024"], 4),
        "bpb_4x_after": round(after["256-1024"], 4),
        "bpb_native_before": round(before["0-256"], 4),
        "needle_4x": round(mean_acc(grids[after_label], 1024), 4),
        "needle_4x_before": round(mean_acc(grids["before (plain RoPE)"], 1024), 4),
        "needle_native_after": round(mean_acc(grids[after_label], 256), 4),
        "rope_over_nope_score": round(sum(r["rope_abs"] / r["nope_abs"] for r in split) / len(split), 2),
        "pretrain_seconds": round(pretrain_s, 1),
        "sft_seconds": round(sft_s, 1),
        "long_sft_seconds": round(long_sft_s, 1),
        "stage_seconds": round(stage_s, 1),
        "stage16_seconds": None if stage16_s is None else round(stage16_s, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "heatmap": str(out.with_suffix(".png")),
    }
    if a.x16:
        rec["bpb_16x_after"] = round(bpb["after the 16x stage (4096)"]["1024-4096"], 4)
        rec["bpb_16x_before"] = round(bpb["before (plain RoPE, 4096)"]["1024-4096"], 4)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
