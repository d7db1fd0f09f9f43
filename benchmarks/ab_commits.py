"""This checkout's dsv3 against an older checkout's, in one process: training step and greedy decode.

A refactor must not cost speed. The older package is copied into a temporary directory under the name
`dsv3_old` (every `dsv3` identifier in its sources renamed), so both versions run side by side on the
same weights and inputs, alternating, several repetitions each, medians compared:

- train: forward + loss (MTP 0.3, sequence balance) + backward + clip + AdamW under BF16 autocast, the
  tiny preset at batch 8 x 256; each side set up as its trainer sets it up on a CPU (the new code applies
  `dsv3.cpu.apply_cpu_training`; the old code had the same paths inside the model);
- decode: `LLM.generate`, 128-token prompts, 128 new tokens, greedy, batch 1 and 8 (each engine applies
  its own CPU decode paths); generated ids must agree.

    python benchmarks/ab_commits.py --old-src /path/to/old/checkout/src [--reps 5] [--threads 2]

Last line: JSON with ours (new, tokens/s), baseline (old, tokens/s), ratio (the lowest of the three
new/old ratios) and each part's figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def load_old(src: Path, tmp: Path):
    """Import the package at src/dsv3 as `dsv3_old` (sources copied with the name rewritten)."""
    dst = tmp / "dsv3_old"
    shutil.copytree(src / "dsv3", dst)
    for f in dst.rglob("*.py"):
        f.write_text(re.sub(r"\bdsv3\b", "dsv3_old", f.read_text()))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("dsv3_old")


def train_step_fn(pkg, model, setup):
    setup(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = pkg.lm_loss(out, y, 0.3, 1e-4, "seq")
        counts = [s.counts for s in out.router_stats]
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the balance-bias update, as the trainer does it
            for moe, c in zip(model.moe_layers(), counts):
                b = moe.gate.e_score_correction_bias
                b += 1e-3 * torch.sign(c.float().mean() - c.float())
        return float(loss.loss)

    return step


def timed(fn, n: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-src", required=True, type=Path, help="the older checkout's src/ directory")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed repetition")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: train, decode1, decode8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import dsv3
    from dsv3.cpu import apply_cpu_training
    from dsv3.runtime import tune_malloc

    tune_malloc()
    tmp = Path(tempfile.mkdtemp())
    old = load_old(args.old_src, tmp)
    from dsv3_old.inference import LLM as OldLLM
    from dsv3_old.inference import SamplingParams as OldParams

    from dsv3.inference import LLM, SamplingParams

    cfg = dsv3.ModelConfig.from_preset(args.preset)
    old_cfg = old.ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    state = dsv3.Transformer(cfg).state_dict()

    def models():
        new_m, old_m = dsv3.Transformer(cfg), old.Transformer(old_cfg)
        new_m.load_state_dict(state)
        old_m.load_state_dict(state)
        return new_m, old_m

    skip = set(args.skip.split(",")) - {""}
    result: dict = {"benchmark": "ab_commits", "preset": args.preset, "threads": args.threads}
    ratios = {}
    if "train" not in skip:
        new_m, old_m = models()
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, cfg.vocab_size, (8, 256), generator=g)
        y = torch.roll(x, -1, dims=1)
        steps = {
            "new": train_step_fn(dsv3, new_m, apply_cpu_training),
            "old": train_step_fn(old, old_m, lambda m: m),
        }
        losses = {k: s(x, y) for k, s in steps.items()}  # warm-up; same weights, same first loss
        times = {"new": [], "old": []}
        for _ in range(args.reps):
            for k in ("old", "new"):
                times[k].append(timed(lambda k=k: steps[k](x, y), args.steps))
        tok = x.numel()
        t = {k: tok / statistics.median(v) for k, v in times.items()}
        ratios["train"] = t["new"] / t["old"]
        result["train"] = {
            "new_tok_s": round(t["new"], 1),
            "old_tok_s": round(t["old"], 1),
            "ratio": round(ratios["train"], 3),
            "first_loss": {k: round(v, 5) for k, v in losses.items()},
            "new_ms": [round(v * 1e3) for v in times["new"]],
            "old_ms": [round(v * 1e3) for v in times["old"]],
        }
        print(json.dumps({"train": result["train"]}), flush=True)
    for batch in (1, 8):
        if f"decode{batch}" in skip:
            continue
        new_m, old_m = (m.eval() for m in models())
        g = torch.Generator().manual_seed(2)
        prompts = torch.randint(2, cfg.vocab_size, (batch, 128), generator=g).tolist()
        engines = {
            "new": (LLM(new_m, max_batch_size=batch, max_seq_len=512), SamplingParams),
            "old": (OldLLM(old_m, max_batch_size=batch, max_seq_len=512), OldParams),
        }

        def gen(k, n=args.new_tokens, engines=engines, prompts=prompts):
            llm, params = engines[k]
            return [
                o.token_ids
                for o in llm.generate(prompts, params(max_new_tokens=n, temperature=0, ignore_eos=True))
            ]

        ids = {k: gen(k) for k in engines}  # warm-up
        times = {"new": [], "old": []}
        for _ in range(args.reps):
            for k in ("old", "new"):
                times[k].append(timed(lambda k=k: gen(k)))
        tok = batch * args.new_tokens
        t = {k: tok / statistics.median(v) for k, v in times.items()}
        ratios[f"decode{batch}"] = t["new"] / t["old"]
        result[f"decode_b{batch}"] = {
            "new_tok_s": round(t["new"], 1),
            "old_tok_s": round(t["old"], 1),
            "ratio": round(ratios[f"decode{batch}"], 3),
            "same_ids": ids["new"] == ids["old"],
        }
        print(json.dumps({f"decode_b{batch}": result[f"decode_b{batch}"]}), flush=True)
    worst = min(ratios, key=ratios.get)
    part = result["train"] if worst == "train" else result[f"decode_b{worst[-1]}"]
    result.update(
        ours=part["new_tok_s"],
        baseline=part["old_tok_s"],
        ratio=round(ratios[worst], 3),
        worst=worst,
        unit="tokens/s",
    )
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
