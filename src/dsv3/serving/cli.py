"""`dsv3 serve`: an OpenAI-compatible HTTP server.

The API key comes from `--api-key` or, kept out of `ps`, the `DSV3_API_KEY` environment variable (as vLLM
reads VLLM_API_KEY); with either set, /v1 needs `Authorization: Bearer KEY` (and /metrics with
`--protect-metrics`)."""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory or a training run directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 endpoints (default: $DSV3_API_KEY; the variable "
        "keeps the key out of the process list)",
    )
    p.add_argument("--protect-metrics", action="store_true", help="/metrics needs the API key too")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 << 20,
        help="request bodies larger than this get 413 before they are read (default 4 MiB)",
    )
    p.add_argument(
        "--served-model-name", default=None, help="model id clients send (default: directory name)"
    )
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429"
    )
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (prompt + completion)")
    p.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument(
        "--disaggregate", action="store_true", help="prefill and decode in separate worker processes"
    )
    p.add_argument("--prefill-workers", type=int, default=1, help="prefill processes (--disaggregate)")
    p.add_argument("--decode-workers", type=int, default=1, help="decode processes (--disaggregate)")
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM: seconds open requests may still run; then each is ended with an error event",
    )


def run(args: argparse.Namespace) -> int:
    from dsv3.serving.server import build_server, load_state

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    state = load_state(
        args.model,
        model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get("DSV3_API_KEY") or None,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_seq_len=args.max_seq_len,
        speculative=args.speculative,
        dtype=args.dtype,
        disaggregate=args.disaggregate,
        prefill_workers=args.prefill_workers,
        decode_workers=args.decode_workers,
        max_body_bytes=args.max_body_bytes,
        protect_metrics=args.protect_metrics,
    )
    print(f"dsv3 serving {state.model_name!r} on http://{args.host}:{args.port}/v1", flush=True)
    build_server(state, args.host, args.port, args.graceful_timeout, log_level="info").run()
    return 0
