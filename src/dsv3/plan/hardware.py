"""GPU presets: peak dense tensor-core throughput, memory and link bandwidths.

Sources and assumptions (all figures per GPU, dense, i.e. without 2:4 sparsity):
- H800 SXM: the export variant of H100 SXM with the same tensor cores (989.5 TFLOP/s BF16, 1979 FP8) and
  NVLink cut to 400 GB/s bidirectional. The DeepSeek-V3 report (sec. 3.4.2) measures 160 GB/s of usable
  NVLink and 50 GB/s of InfiniBand (one 400 Gb/s ConnectX-7 NIC per GPU) on its cluster: those are the
  values used here, since reproducing the report is the point.
- H100 SXM (NVIDIA H100 datasheet): 989.5 / 1979 TFLOP/s; NVLink 4 900 GB/s bidirectional, taken as
  450 GB/s per direction; one 400 Gb/s NDR NIC per GPU = 50 GB/s.
- H200 SXM (NVIDIA H200 datasheet): the H100's compute and links with 141 GB of HBM3e.
- B200 (NVIDIA HGX/DGX B200 datasheets: 72 PFLOP/s FP8 and 36 BF16 per 8 GPUs *with* sparsity): 2250 dense
  BF16, 4500 dense FP8 TFLOP/s; NVLink 5 1.8 TB/s bidirectional = 900 GB/s per direction; DGX B200 ships one
  400 Gb/s ConnectX-7 per GPU = 50 GB/s.
Memory is what the driver reports as total (nvidia-smi: 81559 MiB for the 80 GB parts, 143771 MiB for
H200, 183359 MiB for B200); the planner keeps a separate reserve for the CUDA context and fragmentation.
Link bandwidths other than H800's are nominal; real all-to-all reaches less. Every figure can be
overridden on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType

TFLOPS = 1e12
GBPS = 1e9
MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_flops: float  # peak dense BF16 tensor FLOP/s
    fp8_flops: float  # peak dense FP8 tensor FLOP/s
    memory_bytes: int
    nvlink_bw: float  # bytes/s per GPU per direction (intra-node)
    ib_bw: float  # bytes/s per GPU per direction (inter-node)
    gpus_per_node: int = 8

    def peak_flops(self, precision: str) -> float:
        if precision == "bf16":
            return self.bf16_flops
        if precision == "fp8":
            return self.fp8_flops
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")

    def replace(self, **kw: float | int | None) -> Hardware:
        """A copy with the given fields overridden (None leaves a field as it is); validated."""
        hw = dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})
        for f in ("bf16_flops", "fp8_flops", "memory_bytes", "nvlink_bw", "ib_bw", "gpus_per_node"):
            if not getattr(hw, f) > 0:
                raise ValueError(f"hardware {hw.name}: {f} must be > 0, got {getattr(hw, f)!r}")
        return hw


HARDWARE: MappingProxyType[str, Hardware] = MappingProxyType(
    {
        "h800": Hardware("H800", 989.5 * TFLOPS, 1979 * TFLOPS, 81559 * MIB, 160 * GBPS, 50 * GBPS),
        "h100": Hardware("H100", 989.5 * TFLOPS, 1979 * TFLOPS, 81559 * MIB, 450 * GBPS, 50 * GBPS),
        "h200": Hardware("H200", 989.5 * TFLOPS, 1979 * TFLOPS, 143771 * MIB, 450 * GBPS, 50 * GBPS),
        "b200": Hardware("B200", 2250 * TFLOPS, 4500 * TFLOPS, 183359 * MIB, 900 * GBPS, 50 * GBPS),
    }
)


def get_hardware(name: str) -> Hardware:
    key = name.lower()
    if key not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; available: {', '.join(HARDWARE)}")
    return HARDWARE[key]
