"""Serving throughput and latency: N streaming clients at once vs the same requests one after another.

The server is `dsv3 serve` in a subprocess on 127.0.0.1 over the tiny model: runs/tiny/model when it
exists (a trained run), else the tiny preset with random weights and a byte-level BPE tokenizer trained
in a second on the bundled corpus (saved as an HF directory in a temporary folder). The clients are
asyncio + httpx in this process, each sending `POST /v1/completions` with `stream: true` (greedy, fixed
max_tokens, usage included) for prompts cut from the corpus.

For each concurrency c in --concurrency (1 = the sequential baseline: the same requests, one after
another) the same --requests requests are sent by c clients that each take the next request when their
last one ends. Measured per run: output tokens/s (completion tokens from `usage` over the run's wall
time), time to first token (request sent -> first text chunk) and inter-token latency (gaps between text
chunks of one stream) p50/p99. Runs alternate over the concurrencies, --reps times; medians reported.
Last line: JSON with ours = throughput at 8 clients, baseline = sequential throughput, ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import httpx


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def make_model_dir(tmp: Path) -> Path:
    """runs/tiny/model if it exists, else a random tiny model with a freshly trained tokenizer."""
    trained = Path("runs/tiny/model")
    if (trained / "config.json").is_file():
        return trained
    import torch

    from dsv3.checkpoint import save_pretrained
    from dsv3.config import ModelConfig
    from dsv3.model import Transformer
    from dsv3.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    text = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()
    tok = Tokenizer.train([text[:200_000]], cfg.vocab_size)
    return save_pretrained(Transformer(cfg).eval(), tmp / "tiny", tokenizer=tok)


def start_server(model_dir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dsv3.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--max-batch-size", str(args.max_batch_size), "--max-queue", "256", "--dtype", args.dtype]
    cmd += ["--max-seq-len", str(args.max_seq_len), *args.server_args.split()]
    env = dict(os.environ)
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become healthy within 300 s")


async def one_request(client: httpx.AsyncClient, base: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    ttft = times[0] - t0 if times else float("nan")
    return {"ttft": ttft, "itl": [b - a for a, b in zip(times, times[1:])], "tokens": tokens}


async def run_load(base: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """`concurrency` clients drain the list of prompts; returns throughput and latency samples."""
    todo = list(prompts)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            while todo:
                results.append(await one_request(client, base, todo.pop(0), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "ttft": [r["ttft"] for r in results],
        "itl": [x for r in results for x in r["itl"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32, help="requests per run (the same set every run)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--prompt-words", type=int, default=24, help="words per prompt (cut from the corpus)")
    ap.add_argument("--concurrency", default="1,8,32", help="client counts; 1 is the sequential baseline")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="server OMP_NUM_THREADS (0: inherit). 1 by default: the tiny model gains nothing from a second "
        "thread, and two OpenMP threads on a 2-core CPU shared with other work wait on each other",
    )
    ap.add_argument("--server-args", default="", help="extra `dsv3 serve` arguments, e.g. '--disaggregate'")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if 1 not in levels or 8 not in levels:
        raise SystemExit("--concurrency must include 1 (the baseline) and 8 (the headline figure)")

    words = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text().split()
    rng = random.Random(0)
    starts = [rng.randrange(len(words) - args.prompt_words) for _ in range(args.requests)]
    prompts = [" ".join(words[s : s + args.prompt_words]) for s in starts]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp))
        proc, base = start_server(model_dir, args)
        try:
            asyncio.run(run_load(base, prompts[:4], 4, args.max_tokens))  # warm-up
            runs: dict[int, list[dict]] = {c: [] for c in levels}
            for rep in range(args.reps):
                for c in levels:
                    r = asyncio.run(run_load(base, prompts, c, args.max_tokens))
                    runs[c].append(r)
                    print(
                        f"rep {rep} clients {c:>3}: {r['tokens_per_s']:7.1f} tok/s ({r['tokens']} tokens, "
                        f"{r['wall_s']:.2f} s)  TTFT p50 {percentile(r['ttft'], 50) * 1e3:7.1f} ms  "
                        f"ITL p50 {percentile(r['itl'], 50) * 1e3:6.1f} ms  "
                        f"p99 {percentile(r['itl'], 99) * 1e3:6.1f} ms",
                        flush=True,
                    )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def med(c: int, f) -> float:
        return statistics.median(f(r) for r in runs[c])

    per_level = {
        f"clients_{c}": {
            "tokens_per_s": round(med(c, lambda r: r["tokens_per_s"]), 2),
            "ttft_p50_s": round(med(c, lambda r: percentile(r["ttft"], 50)), 5),
            "ttft_p99_s": round(med(c, lambda r: percentile(r["ttft"], 99)), 5),
            "itl_p50_s": round(med(c, lambda r: percentile(r["itl"], 50)), 5),
            "itl_p99_s": round(med(c, lambda r: percentile(r["itl"], 99)), 5),
        }
        for c in levels
    }
    ours = per_level["clients_8"]["tokens_per_s"]
    base_tps = per_level["clients_1"]["tokens_per_s"]
    print(
        json.dumps(
            {
                "metric": "serving output tokens/s: 8 streaming clients vs the same requests sequentially",
                "ours": ours,
                "baseline": base_tps,
                "ratio": round(ours / base_tps, 3),
                "unit": "tokens/s",
                **per_level,
                "setup": {
                    "model": str(model_dir) if "runs" in str(model_dir) else "tiny preset, random weights",
                    "requests": args.requests,
                    "max_tokens": args.max_tokens,
                    "prompt_words": args.prompt_words,
                    "max_batch_size": args.max_batch_size,
                    "dtype": args.dtype,
                    "server_threads": args.server_threads or "inherited",
                    "server_args": args.server_args,
                    "cpus": os.cpu_count(),
                },
                "reps": args.reps,
            }
        )
    )


if __name__ == "__main__":
    main()
