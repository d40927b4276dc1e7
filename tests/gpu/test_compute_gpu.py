"""The peak probe and peak memory on a CUDA device (marker gpu)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from turnout.trainer.metrics.compute import peak_memory_mb, probe_dtype, probe_peak_tflops

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def test_probe_measures_the_gpu_in_bf16_within_its_budget() -> None:
    dtype = probe_dtype(CUDA, bf16=torch.cuda.is_bf16_supported())
    t0 = time.perf_counter()
    peak = probe_peak_tflops(CUDA, dtype, budget_s=2.0)
    assert time.perf_counter() - t0 < 30.0
    # Any CUDA GPU beats 1 TFLOP/s on a large GEMM; none reaches 10 PFLOP/s dense.
    assert math.isfinite(peak) and 1.0 < peak < 10_000.0


def test_peak_memory_on_cuda_is_the_max_allocated() -> None:
    torch.cuda.reset_peak_memory_stats(CUDA)
    block = torch.empty(512 * 2**20, dtype=torch.uint8, device=CUDA)  # 512 MiB
    del block
    assert peak_memory_mb(CUDA) >= 512
