"""Prompt scoring throughput: `echo` + `max_tokens=0` requests to `dsv3 serve` from 8 concurrent clients vs
transformers computing the same log-probabilities in a batched forward on the exported model.

Scoring a text (perplexity, multiple-choice evaluation as lm-evaluation-harness does it) needs each prompt
token's log-probability and no generation. Ours: `dsv3 serve` in a subprocess (the model of
benchmarks/serving.py: runs/tiny/model when it exists, else the tiny preset with random weights), and
--clients threads that each take the next prompt and POST /v1/completions {prompt: token ids, echo: true,
max_tokens: 0, logprobs: 1} (what lm_eval's local-completions sends, less its one generated token).
Baseline: transformers' AutoModelForCausalLM on the same directory, in this process, log_softmax of the
logits of right-padded batches of --hf-batch-size prompts, the scored token's log-prob gathered. Both run
in --dtype with the same thread count (--threads, for the server's OMP_NUM_THREADS and torch here).
Throughput = prompt tokens scored / wall seconds. Runs alternate (ours, baseline) --reps times; medians.

Prompts are token ids (BOS + text cut from the corpus), so both sides score exactly the same tokens; the
last run's log-probabilities of the two are compared (max abs difference, all tokens but the first).
Last line: JSON {"ours", "baseline", "ratio", "unit": "tokens/s", "max_abs_diff", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import make_model_dir, start_server  # noqa: E402  (the same model and server start)


def score_server(base: str, prompts: list[list[int]], clients: int) -> tuple[float, list[list[float]]]:
    """(tokens/s, per prompt the log-probs of tokens 1..) from `clients` threads draining the prompts."""
    todo = list(range(len(prompts)))
    lock = threading.Lock()
    out: list[list[float]] = [[] for _ in prompts]
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(timeout=600.0) as client:
            while True:
                with lock:
                    if not todo or errors:
                        return
                    i = todo.pop(0)
                body = {"prompt": prompts[i], "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
                r = client.post(base + "/v1/completions", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:500]}")
                    return
                lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
                out[i] = [float(x) for x in lps[1:]]

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"the server refused a scoring request: {errors[0]}")
    return sum(len(p) for p in prompts) / wall, out


@torch.no_grad()
def score_hf(model, prompts: list[list[int]], batch_size: int) -> tuple[float, list[list[float]]]:
    """(tokens/s, log-probs of tokens 1..) from transformers, right-padded batches with an attention mask."""
    out: list[list[float]] = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s : s + batch_size]
        T = max(map(len, batch))
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # [B, T, V]
        picked = logp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)  # log p(token t | < t)
        out += [picked[i, : len(p) - 1].tolist() for i, p in enumerate(batch)]
    wall = time.perf_counter() - t0
    return sum(len(p) for p in prompts) / wall, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64, help="prompts per run (the same set every run)")
    ap.add_argument("--prompt-words", type=int, default=96, help="words per prompt (cut from the corpus)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent scoring clients")
    ap.add_argument("--hf-batch-size", type=int, default=8, help="transformers' batch (prompts per forward)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-batch-size", type=int, default=8, help="the server's engine batch")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1, help="server OMP_NUM_THREADS and torch threads here")
    args = ap.parse_args()
    args.server_threads, args.server_args = args.threads, ""  # what serving.start_server reads
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import transformers

    from dsv3.tokenizer import Tokenizer

    words = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text().split()
    rng = random.Random(0)
    starts = [rng.randrange(len(words) - args.prompt_words) for _ in range(args.requests)]
    texts = [" ".join(words[s : s + args.prompt_words]) for s in starts]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp))
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        prompts = [([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(t) for t in texts]
        prompts = [p[: args.max_seq_len - 1] for p in prompts]
        dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        proc, base = start_server(model_dir, args)
        try:
            score_server(base, prompts[:4], 4)  # warm-up, both sides
            score_hf(hf, prompts[: args.hf_batch_size], args.hf_batch_size)
            ours, theirs = [], []
            for rep in range(args.reps):
                o, o_lp = score_server(base, prompts, args.clients)
                b, b_lp = score_hf(hf, prompts, args.hf_batch_size)
                ours.append(o)
                theirs.append(b)
                print(f"rep {rep}: dsv3 serve {o:9.1f} tok/s   transformers {b:9.1f} tok/s", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    diff = max(abs(a - b) for x, y in zip(o_lp, b_lp) for a, b in zip(x, y))
    if any(len(x) != len(y) for x, y in zip(o_lp, b_lp)):
        raise SystemExit("the server and transformers scored different numbers of tokens")
    med_ours, med_base = statistics.median(ours), statistics.median(theirs)
    print(
        json.dumps(
            {
                "metric": f"prompt scoring tokens/s: dsv3 serve echo+max_tokens=0, {args.clients} clients, "
                f"vs transformers batched forward (batch {args.hf_batch_size})",
                "ours": round(med_ours, 2),
                "baseline": round(med_base, 2),
                "ratio": round(med_ours / med_base, 3),
                "unit": "tokens/s",
                "max_abs_diff": diff,
                "tokens_per_run": sum(len(p) for p in prompts),
                "setup": {
                    "model": str(model_dir) if "runs" in str(model_dir) else "tiny preset, random weights",
                    "requests": args.requests,
                    "prompt_words": args.prompt_words,
                    "clients": args.clients,
                    "hf_batch_size": args.hf_batch_size,
                    "max_batch_size": args.max_batch_size,
                    "dtype": args.dtype,
                    "threads": args.threads or "inherited",
                    "cpus": os.cpu_count(),
                },
                "reps": args.reps,
            }
        )
    )


if __name__ == "__main__":
    main()
