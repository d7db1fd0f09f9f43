"""Checkpoints: HF-format safetensors in and out (FP8 block scales, the MTP layer), conversion."""

from dsv3.checkpoint.hf import convert_checkpoint, from_pretrained, resolve_model_dir, save_pretrained

__all__ = ["convert_checkpoint", "from_pretrained", "resolve_model_dir", "save_pretrained"]
