"""`dsv3 generate`: text from a run directory or an HF checkpoint, streamed as it is produced.

    dsv3 generate --checkpoint runs/tiny --prompt "ROMEO:" --max-new-tokens 100 --temperature 0.8
    dsv3 generate --checkpoint runs/tiny --prompt "ROMEO:" --speculative      # MTP drafting
    dsv3 generate --checkpoint runs/tiny --interactive                         # a read-eval loop on stdin

Statistics (tokens, tokens/s, time to first token, MTP acceptance) go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from dsv3.inference.engine import Engine, RequestOutput
from dsv3.inference.sampling import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory or HF model directory")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    parser.add_argument(
        "--interactive", action="store_true", help="chat-like loop: each stdin line is a turn"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--max-batch-size", type=int, default=8)


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=list(args.stop),
        seed=args.seed,
    ).validate()


def stream(
    engine: Engine, request_id: str, prompt: str, params: SamplingParams, out: TextIO
) -> RequestOutput:
    """Run one request to completion, writing its text to `out` as it arrives."""
    result = engine.add_request(request_id, prompt, params)
    out.write(prompt)
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == request_id and o.new_text:
                out.write(o.new_text)
                out.flush()
    return result


def _report(outs: list[RequestOutput], err: TextIO) -> None:
    for o in outs:
        n = len(o.token_ids)
        total = o.total_time or 0.0
        ttft = o.time_to_first_token or 0.0
        line = f"[{o.request_id}] {n} tokens, {n / total if total else 0:.1f} tok/s, ttft {ttft * 1e3:.1f} ms"
        line += f", finish: {o.finish_reason}"
        if o.spec is not None:
            line += (
                f", MTP acceptance {o.spec.acceptance:.2f}, {o.spec.tokens_per_forward:.2f} tokens/forward"
            )
        print(line, file=err)


def _interactive(engine: Engine, args: argparse.Namespace, inp: TextIO, out: TextIO, err: TextIO) -> int:
    """Each line continues one running transcript (kept within max_seq_len); /reset clears it, /quit ends."""
    params = _params(args)
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("interactive mode needs a tokenizer")
    head = [] if tok.bos_id is None else [tok.bos_id]
    history: list[int] = []
    budget = engine.max_seq_len - 1 - params.max_new_tokens - len(head)
    if budget < 1:
        raise ValueError(
            f"--max-new-tokens {params.max_new_tokens} leaves no room for a prompt in max_seq_len"
        )
    print("dsv3 interactive: type a line, /reset to clear the context, /quit (or EOF) to leave", file=err)
    turn = 0
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() == "/quit":
            return 0
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history = (history + tok.encode(line + "\n"))[-budget:]
        ids = head + history
        turn += 1
        o = engine.add_request(f"turn-{turn}", ids, params)
        while engine.has_unfinished():
            for s in engine.step():
                if s.new_text:
                    out.write(s.new_text)
                    out.flush()
        out.write("\n")
        history += o.token_ids
        _report([o], err)


def run(args: argparse.Namespace, inp: TextIO | None = None, out: TextIO | None = None) -> int:
    from dsv3.inference.llm import LLM

    inp, out, err = inp or sys.stdin, out or sys.stdout, sys.stderr
    params = _params(args)
    if not args.prompt and not args.interactive:
        raise ValueError("give --prompt TEXT (repeatable) or --interactive")
    llm = LLM(
        args.checkpoint, dtype=args.dtype, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len
    )
    if llm.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json: text prompts need one")
    engine = llm.engine
    engine.speculative = args.speculative
    if args.interactive:
        return _interactive(engine, args, inp, out, err)
    if len(args.prompt) == 1:
        o = stream(engine, "prompt-0", args.prompt[0], params, out)
        out.write("\n")
        _report([o], err)
        return 0
    outs = llm.generate(args.prompt, params, speculative=args.speculative)
    for p, o in zip(args.prompt, outs):
        out.write(f"=== {o.request_id}\n{p}{o.text}\n")
    _report(outs, err)
    return 0
