"""Greedy decode throughput: dsv3's engine vs transformers' DeepseekV3ForCausalLM.generate.

Same random weights (the tiny preset, moved through an HF checkpoint directory), same prompts (128 random
tokens), 128 new tokens, greedy, EOS ignored; batch 1 and batch 8. Ours and the baseline alternate, several
repetitions each, medians reported; the generated ids are compared as a sanity check. Then the time per
decoded token at a 128-token and a 2048-token context (batch 1) for both: dsv3 attends over the cached
latent (absorbed MLA), transformers re-expands the cached latent through kv_b_proj at every step.

    python benchmarks/decode_throughput.py [--dtype float32|bfloat16] [--reps 5] [--threads 2]

Last line: JSON with ours / baseline (tokens/s at the batch size with the lower ratio), ratio (the lower of
the two batch sizes' ratios) and the per-batch and per-context figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.inference import LLM, SamplingParams, kv_cache_bytes_per_token


def hf_model(model: Transformer, dtype: torch.dtype):
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d, dtype=torch.float32)
        return transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype).eval()


def hf_generate(hf, prompts: torch.Tensor, new: int) -> tuple[float, list[list[int]]]:
    with torch.inference_mode():
        t = time.perf_counter()
        out = hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        dt = time.perf_counter() - t
    return dt, out[:, prompts.shape[1] :].tolist()


def ours_generate(llm: LLM, prompts: torch.Tensor, new: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts.tolist(), params)
    dt = time.perf_counter() - t
    return dt, [o.token_ids for o in outs]


def throughput(llm: LLM, hf, batch: int, prompt_len: int, new: int, reps: int, gen: torch.Generator) -> dict:
    V = llm.config.vocab_size
    prompts = torch.randint(2, V, (batch, prompt_len), generator=gen)
    ours_generate(llm, prompts, 4)  # warm-up both
    hf_generate(hf, prompts, 4)
    ours_t, hf_t, match = [], [], []
    for _ in range(reps):
        t_o, ids_o = ours_generate(llm, prompts, new)
        t_h, ids_h = hf_generate(hf, prompts, new)
        ours_t.append(t_o)
        hf_t.append(t_h)
        match.append(sum(a == b for a, b in zip(ids_o, ids_h)) / batch)
    ours = batch * new / statistics.median(ours_t)
    base = batch * new / statistics.median(hf_t)
    return {
        "ours": round(ours, 1),
        "baseline": round(base, 1),
        "ratio": round(ours / base, 3),
        "ours_s": [round(t, 4) for t in ours_t],
        "baseline_s": [round(t, 4) for t in hf_t],
        "rows_identical": statistics.mean(match),
    }


def per_token(llm: LLM, hf, context: int, new: int, reps: int, gen: torch.Generator) -> dict:
    """Milliseconds per decoded token (batch 1) after a `context`-token prompt, median over reps.

    dsv3: from the request's own timing (finish - first token) / (new - 1); transformers: the difference
    of two generate calls, (t(new) - t(1)) / (new - 1)."""
    V = llm.config.vocab_size
    prompt = torch.randint(2, V, (1, context), generator=gen)
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    ours_d, hf_d = [], []
    for _ in range(reps):
        (o,) = llm.generate(prompt.tolist(), params)
        ours_d.append((o.finish_time - o.first_token_time) / (new - 1))
        hf_d.append((hf_generate(hf, prompt, new)[0] - hf_generate(hf, prompt, 1)[0]) / (new - 1))
    return {
        "ours_ms": round(statistics.median(ours_d) * 1e3, 3),
        "baseline_ms": round(statistics.median(hf_d) * 1e3, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--long-context", type=int, default=2048)
    ap.add_argument("--skip-context", action="store_true", help="only the throughput part")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    model = Transformer(cfg).eval()
    hf = hf_model(model, dtype)
    llm = LLM(model, dtype=dtype, max_batch_size=8, max_seq_len=args.long_context + args.new_tokens + 8)
    gen = torch.Generator().manual_seed(1)
    result: dict = {"preset": args.preset, "dtype": args.dtype, "threads": args.threads, "unit": "tokens/s"}
    for batch in (1, 8):
        r = throughput(llm, hf, batch, args.prompt_len, args.new_tokens, args.reps, gen)
        result[f"batch_{batch}"] = r
        print(
            f"batch {batch}: ours {r['ours']} tok/s, transformers {r['baseline']} tok/s, ratio {r['ratio']}"
        )
    if not args.skip_context:
        ctx = {}
        for c in (args.prompt_len, args.long_context):
            ctx[c] = per_token(llm, hf, c, 33, max(3, args.reps), gen)
            print(f"context {c}: ms/token ours {ctx[c]['ours_ms']}, transformers {ctx[c]['baseline_ms']}")
        short, long = ctx[args.prompt_len], ctx[args.long_context]
        result["ms_per_token"] = {str(c): v for c, v in ctx.items()}
        result["context_growth"] = {
            "ours": round(long["ours_ms"] / short["ours_ms"], 3),
            "baseline": round(long["baseline_ms"] / short["baseline_ms"], 3),
        }
    worst = min((1, 8), key=lambda b: result[f"batch_{b}"]["ratio"])
    result.update(
        ours=result[f"batch_{worst}"]["ours"],
        baseline=result[f"batch_{worst}"]["baseline"],
        ratio=result[f"batch_{worst}"]["ratio"],
        ratio_batch=worst,
        kv_cache_bytes_per_token={
            args.preset: kv_cache_bytes_per_token(cfg, dtype),
            "deepseek-v3-671b_bf16": kv_cache_bytes_per_token(ModelConfig.from_preset("deepseek-v3-671b")),
        },
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
