"""FP8 mixed precision with fine-grained (1x128 activation tiles, 128x128 weight blocks) scaling."""

from dsv3.fp8.blockwise import dequantize_weight_blockwise, quantize_weight_blockwise

__all__ = ["dequantize_weight_blockwise", "quantize_weight_blockwise"]
