"""Inference: static latent KV cache, sampling, prefill/decode, MTP speculative decoding, the engine and
the `LLM` Python API. `EngineProtocol` is the interface the server drives (dsv3.inference.protocol)."""

from dsv3.inference.cache import LatentKVCache, kv_cache_bytes_per_token
from dsv3.inference.engine import Engine
from dsv3.inference.llm import LLM
from dsv3.inference.protocol import EngineProtocol, RequestOutput, StepOutput, TokenizerProtocol
from dsv3.inference.sampling import SamplingParams
from dsv3.inference.speculative import SpecStats, speculative_generate, speculative_step

__all__ = [
    "LLM",
    "Engine",
    "EngineProtocol",
    "LatentKVCache",
    "RequestOutput",
    "SamplingParams",
    "SpecStats",
    "StepOutput",
    "TokenizerProtocol",
    "kv_cache_bytes_per_token",
    "speculative_generate",
    "speculative_step",
]
