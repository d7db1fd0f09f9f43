"""Server health under abusive clients: /health latency while 4 clients send 10 MB bodies and 8 stream
normally, against the same 8 streams without the abusive clients; the server's resident memory before,
during and after.

The server is `dsv3 serve` in a subprocess on 127.0.0.1 over a random model of --preset (debug by
default) with a byte-level BPE tokenizer trained on the bundled corpus, default limits (4 MiB bodies).
Each phase lasts --seconds: 8 threads stream `POST /v1/completions` (greedy, --max-tokens) back to back,
one thread polls /health every 20 ms and records its latency, and in the abuse phase 4 more threads send
10 MB JSON bodies back to back (each answered 413 unread). Resident memory (VmRSS) is sampled every
50 ms; "after" is read 2 s after the abuse phase. Last line: JSON with ours = /health p99 ms under abuse,
baseline = p99 ms without, ratio; target p99 under abuse < 100 ms and memory after within 10% of before.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

import httpx


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


def make_model_dir(tmp: Path, preset: str) -> Path:
    import torch

    from dsv3.checkpoint import save_pretrained
    from dsv3.config import ModelConfig
    from dsv3.model import Transformer
    from dsv3.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    text = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()
    tok = Tokenizer.train([text[:100_000]], cfg.vocab_size)
    return save_pretrained(Transformer(cfg).eval(), tmp / preset, dtype=torch.float32, tokenizer=tok)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_phase(base: str, pid: int, seconds: float, abusive: int, max_tokens: int) -> dict:
    stop = threading.Event()
    health: list[float] = []
    rss: list[float] = []
    counts = {"streams": 0, "abusive_sent": 0, "abusive_413": 0, "errors": 0}
    lock = threading.Lock()
    big = json.dumps({"prompt": "x" * (10 << 20), "max_tokens": 4}).encode()

    def bump(key: str) -> None:
        with lock:
            counts[key] += 1

    def streamer(i: int) -> None:
        body = {"prompt": f"To be, or not {i}", "max_tokens": max_tokens, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                with c.stream("POST", base + "/v1/completions", json=body) as r:
                    lines = [x for x in r.iter_lines() if x]
                bump("streams" if lines and lines[-1] == "data: [DONE]" else "errors")

    def abuser() -> None:
        while not stop.is_set():
            try:
                with httpx.Client(timeout=60) as c:
                    r = c.post(
                        base + "/v1/completions", content=big, headers={"Content-Type": "application/json"}
                    )
                bump("abusive_413" if r.status_code == 413 else "errors")
            except httpx.HTTPError:  # the server may close the connection before the upload ends
                bump("abusive_413")
            bump("abusive_sent")

    def poller() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                ok = c.get(base + "/health").status_code == 200
                health.append((time.perf_counter() - t0) * 1000)
                if not ok:
                    bump("errors")
                time.sleep(0.02)

    def sampler() -> None:
        while not stop.is_set():
            rss.append(rss_mb(pid))
            time.sleep(0.05)

    threads = [threading.Thread(target=streamer, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=abuser) for _ in range(abusive)]
    threads += [threading.Thread(target=poller), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    return {
        "health_p50_ms": percentile(health, 50),
        "health_p99_ms": percentile(health, 99),
        "health_max_ms": max(health) if health else float("nan"),
        "health_samples": len(health),
        "rss_max_mb": max(rss) if rss else float("nan"),
        **counts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    from dsv3.parallel.launch import free_port

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp), args.preset)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "dsv3.cli", "serve", "--model", str(model_dir), "--port", str(port)]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            run_phase(base, server.pid, 2.0, 0, args.max_tokens)  # warm-up (allocator, caches)
            before = rss_mb(server.pid)
            baseline = run_phase(base, server.pid, args.seconds, 0, args.max_tokens)
            abuse = run_phase(base, server.pid, args.seconds, 4, args.max_tokens)
            time.sleep(2.0)
            after = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(
        f"{'phase':<10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'samples':>8} {'streams':>8} {'413s':>6}"
    )
    for name, r in (("baseline", baseline), ("abuse", abuse)):
        print(
            f"{name:<10} {r['health_p50_ms']:8.1f} {r['health_p99_ms']:8.1f} {r['health_max_ms']:8.1f} "
            f"{r['health_samples']:8d} {r['streams']:8d} {r['abusive_413']:6d}"
        )
    print(f"RSS MB: before {before:.0f}, during abuse (max) {abuse['rss_max_mb']:.0f}, after {after:.0f}")
    ours, base_p99 = abuse["health_p99_ms"], baseline["health_p99_ms"]
    result = {
        "metric": "health_p99_ms_under_10MB_body_abuse",
        "ours": round(ours, 2),
        "baseline": round(base_p99, 2),
        "ratio": round(ours / base_p99, 3),
        "rss_mb_before": round(before, 1),
        "rss_mb_during": round(abuse["rss_max_mb"], 1),
        "rss_mb_after": round(after, 1),
        "rss_after_vs_before": round(after / before, 3),
        "abusive_requests": abuse["abusive_sent"],
        "errors": baseline["errors"] + abuse["errors"],
        "target_met": ours < 100 and after <= 1.1 * before,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
