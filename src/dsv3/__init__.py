"""dsv3: DeepSeek-V3 from scratch in PyTorch — the model, its training system and its inference system."""

from typing import Any

from dsv3.config import ModelConfig
from dsv3.model import Transformer, lm_loss

__version__ = "0.1.0"

_LAZY = {
    "from_pretrained": "dsv3.checkpoint",
    "save_pretrained": "dsv3.checkpoint",
    "LLM": "dsv3.inference",
    "SamplingParams": "dsv3.inference",
}


def __getattr__(name: str) -> Any:
    """Heavier entry points load on first use (`dsv3.LLM`, `dsv3.from_pretrained`, `dsv3.save_pretrained`)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsv3' has no attribute {name!r}")


__all__ = [
    "LLM",
    "ModelConfig",
    "SamplingParams",
    "Transformer",
    "from_pretrained",
    "lm_loss",
    "save_pretrained",
]
