"""Pure single-device DeepSeek-V3 model code (never imports torch.distributed)."""

from dsv3.model.block import Block
from dsv3.model.moe import Gate, GroupedExperts, MoE, RouterStats
from dsv3.model.transformer import IGNORE_INDEX, LossOutput, ModelOutput, Transformer, lm_loss, sample_mask

__all__ = [
    "IGNORE_INDEX",
    "Block",
    "Gate",
    "GroupedExperts",
    "LossOutput",
    "MoE",
    "ModelOutput",
    "RouterStats",
    "Transformer",
    "lm_loss",
    "sample_mask",
]
