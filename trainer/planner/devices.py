"""The planner's device table: vendor peak figures of the accelerators ``turnout plan`` knows."""

from __future__ import annotations

from dataclasses import dataclass

from turnout.config.choices import Precision
from turnout.errors import ConfigError


@dataclass(frozen=True)
class Device:
    """Vendor peak figures of one accelerator (dense, no sparsity)."""

    name: str
    bf16_tflops: float
    fp32_tflops: float
    link_gb_s: float
    """GPU-to-GPU link bandwidth (NVLink, all links, both directions), GB/s."""


#: Vendor datasheet figures: H100 SXM5 (NVIDIA H100 Tensor Core GPU datasheet): 989 TFLOP/s
#: dense BF16 (1979 with sparsity), 67 TFLOP/s FP32, NVLink 900 GB/s. H200 SXM (NVIDIA
#: H200 datasheet): the same compute, NVLink 900 GB/s. A100 SXM4 (NVIDIA A100 datasheet):
#: 312 TFLOP/s dense BF16, 19.5 TFLOP/s FP32, NVLink 600 GB/s. Intra-node figures: an
#: expert-parallel group spanning nodes is bound by the network instead.
DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM", 989.0, 67.0, 900.0),
    "h200": Device("NVIDIA H200 SXM", 989.0, 67.0, 900.0),
    "a100": Device("NVIDIA A100 SXM", 312.0, 19.5, 600.0),
}


DEFAULT_GPU = "h100"


def device(gpu: str) -> Device:
    """The table entry for ``gpu``; ConfigError naming ``--gpu`` when unknown."""
    if gpu not in DEVICES:
        raise ConfigError("--gpu", f"unknown device {gpu!r}; expected one of {', '.join(DEVICES)}")
    return DEVICES[gpu]


def resolve_precision(precision: str) -> str:
    """train.precision on a device of the table: 'auto' is bf16 (all of them have it)."""
    return Precision.BF16.value if precision == Precision.AUTO else str(precision)
