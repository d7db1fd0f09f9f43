"""`dsv3.LLM`: the offline Python API, shaped like vLLM's.

    llm = dsv3.LLM("runs/tiny", dtype=torch.bfloat16, max_batch_size=8, max_seq_len=2048)
    outs = llm.generate(["To be, or not", [5, 17, 3]], SamplingParams(max_new_tokens=64, temperature=0))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].time_to_first_token

A path is an HF model directory or a run directory (its model/ subdirectory), loaded with
`dsv3.checkpoint.from_pretrained` (FP8 checkpoints are dequantised there) in fp32 on a CPU, bf16 on a
GPU unless `dtype` says otherwise. A Transformer instance is used as it is (moved / cast in place when a
device / dtype is given). `fp8=True` (or an FP8Config) swaps the projections for dsv3.fp8's FP8 GEMMs:
Triton kernels on an FP8-capable GPU, an emulation elsewhere. The tokenizer comes from the directory's
tokenizer.json; prompts given as token ids need none.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dsv3.config import ModelConfig
from dsv3.inference.engine import Engine
from dsv3.inference.protocol import RequestOutput, TokenizerProtocol
from dsv3.inference.sampling import SamplingParams
from dsv3.inference.speculative import SpecStats
from dsv3.io import DTYPES as ALL_DTYPES
from dsv3.model import Gate, Transformer
from dsv3.model.rope import rope_inv_freq
from dsv3.tokenizer import Tokenizer

DTYPES = {n: ALL_DTYPES[n] for n in ("float32", "fp32", "bfloat16", "bf16")}  # what inference runs in


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@torch.no_grad()
def cast_model(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Cast weights to dtype in place, keeping what must stay fp32 (balance biases, RoPE frequencies)."""
    device = model.embed.weight.device
    model.to(dtype=dtype)
    for mod in model.modules():
        if isinstance(mod, Gate) and mod.e_score_correction_bias is not None:
            mod.e_score_correction_bias = mod.e_score_correction_bias.float()
    model.inv_freq = rope_inv_freq(model.config)[0].to(device)
    return model


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of a model or run directory, or None when it has no tokenizer.json."""
    p = Path(path)
    candidates = [p / "tokenizer.json", p / "model" / "tokenizer.json"] if p.is_dir() else [p]
    for c in candidates:
        if c.is_file():
            return Tokenizer.from_file(str(c))
    return None


class LLM:
    """Load a model once, then `generate` batches of prompts (continuous batching underneath)."""

    def __init__(
        self,
        model: str | Path | Transformer,
        dtype: torch.dtype | str | None = None,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        tokenizer: TokenizerProtocol | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
        fp8: Any = None,
    ):
        dt = parse_dtype(dtype)
        if isinstance(model, Transformer):
            if device is not None and model.embed.weight.device != torch.device(device):
                model.to(device)
            if dt is not None and model.embed.weight.dtype != dt:
                cast_model(model, dt)
        elif isinstance(model, str | Path):
            from dsv3.checkpoint import from_pretrained, resolve_model_dir

            device = torch.device(device or "cpu")
            if dt is None:  # bf16 GEMMs pay off on GPUs; on a CPU small decode GEMMs run faster in fp32
                dt = torch.bfloat16 if device.type == "cuda" else torch.float32
            model_dir = resolve_model_dir(model)
            model = from_pretrained(model_dir, dtype=dt, device=device)
            if tokenizer is None:
                tokenizer = load_tokenizer(model_dir)
        else:
            raise ValueError(f"LLM expects a path or a dsv3 Transformer, got {type(model).__name__}")
        if fp8 is not None and fp8 is not False:
            from dsv3.fp8 import convert_to_fp8

            # FP8 GEMMs for every projection but the head (Triton kernels on an FP8 GPU, emulated elsewhere)
            convert_to_fp8(model, None if fp8 is True else fp8)
        self.model = model
        self.tokenizer = tokenizer
        self.engine = Engine(
            model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len, seed=seed
        )
        self._ids = itertools.count()
        self.last_spec_stats: SpecStats | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        speculative: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); results in prompt order.

        A bad prompt or parameter raises ValueError before anything runs. With speculative=True the MTP
        module drafts a token that the main model verifies (`RequestOutput.spec`, `last_spec_stats`)."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]  # one prompt
        prompts = list(prompts)
        if not prompts:
            return []
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        if engine.has_unfinished():
            raise ValueError("the engine is busy with other requests (drive it with step() instead)")
        engine.speculative = speculative
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                engine.add_request(rid, prompt, p)
        except ValueError:
            for rid in ids:
                engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        engine.stream_text = False
        try:
            while engine.has_unfinished():
                for o in engine.step():
                    if o.finished:
                        results[o.request_id] = o.output
        finally:
            engine.stream_text = True
        outs = [results[rid] for rid in ids]
        if speculative:
            total = SpecStats(per_position=[0])
            for o in outs:
                total.add(o.spec)
            self.last_spec_stats = total
        return outs
