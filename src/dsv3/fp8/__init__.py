"""FP8 mixed precision with fine-grained (1x128 activation tiles, 128x128 weight blocks) scaling.

`convert_to_fp8(model, config, filter)` turns a built model's GEMMs into FP8 ones (FP8Linear,
FP8GroupedExperts); kernels sit behind `get_backend` ("emulated" everywhere, "triton" / "scaled_mm"
on FP8 GPUs). `quant` is the one tile quantiser, shared by training, the HF checkpoint's E4M3 weights
(`quantize_blocks` gives their weight_scale_inv) and the expert-parallel FP8 dispatch.
"""

from dsv3.fp8.backends import BACKENDS, EmulatedBackend, fp8_gpu_available, get_backend
from dsv3.fp8.config import FP8Config
from dsv3.fp8.convert import convert_to_fp8, default_filter, fp8_module_names
from dsv3.fp8.grouped import FP8GroupedExperts, fp8_grouped_linear
from dsv3.fp8.linear import FP8Linear
from dsv3.fp8.quant import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    FP8NonFiniteError,
    dequantize_blocks,
    dequantize_colwise,
    dequantize_rowwise,
    quantize_blocks,
    quantize_colwise,
    quantize_rowwise,
)

__all__ = [
    "BACKENDS",
    "BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "EmulatedBackend",
    "FP8Config",
    "FP8GroupedExperts",
    "FP8Linear",
    "FP8NonFiniteError",
    "convert_to_fp8",
    "default_filter",
    "dequantize_blocks",
    "dequantize_colwise",
    "dequantize_rowwise",
    "fp8_gpu_available",
    "fp8_grouped_linear",
    "fp8_module_names",
    "get_backend",
    "quantize_blocks",
    "quantize_colwise",
    "quantize_rowwise",
]
