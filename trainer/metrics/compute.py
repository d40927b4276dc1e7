"""What a run computes and what the device can: FLOPs per token, a peak probe, memory.

- :func:`run_flops` counts the training FLOPs per token of the run's model on its micro
  batch and sequence length (:func:`turnout.models.flops.forward_flops`, top-k routing,
  the experts' kept rows, 3x forward) and of the
  dense model of equal shape, whose ratio is what MoD/MoE save;
- :func:`probe_peak_tflops` measures the matmul throughput of this rank's device once,
  the denominator of the MFU when ``train.peak_tflops`` is 0: square GEMMs (fp32 on a
  CPU, bf16 on a GPU when training in bf16) on this rank's threads, best of a few
  timed repeats, inside a time budget;
- :func:`peak_memory_mb` is this process's peak memory: the max resident set size on a
  CPU (``getrusage``), ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

from turnout.config import TurnoutConfig
from turnout.models.flops import dense_counterpart, forward_flops

#: Square GEMM side of the probe: big enough to run near peak, small enough to be quick.
PROBE_SIZE = {"cpu": 1024, "cuda": 8192}
#: Matmuls per timed repeat (a GPU matmul of the probe size takes ~1 ms).
PROBE_MATMULS = {"cpu": 2, "cuda": 20}


@dataclass(frozen=True)
class RunFlops:
    """Training FLOPs per token (forward + backward) of a run's model and its dense twin."""

    per_token: float
    dense_per_token: float

    @property
    def fraction_of_dense(self) -> float:
        """FLOPs per token over those of the dense model of equal shape (< 1: saved)."""
        return self.per_token / self.dense_per_token


def run_flops(cfg: TurnoutConfig) -> RunFlops:
    """Training FLOPs per token of ``cfg.model`` on the run's micro batches."""
    batch, seq = cfg.train.micro_batch_size, cfg.model.max_seq_len
    model = forward_flops(cfg.model, seq, batch)
    dense = forward_flops(dense_counterpart(cfg.model), seq, batch)
    return RunFlops(model.train_per_token, dense.train_per_token)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_peak_tflops(
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    repeats: int = 5,
    budget_s: float = 3.0,
) -> float:
    """Best matmul TFLOP/s of ``device`` over ``repeats`` timed repeats (after a warm-up),
    stopping early once ``budget_s`` seconds are spent; a ``size x size`` GEMM costs
    ``2 size^3`` FLOPs."""
    kind = device.type if device.type in PROBE_SIZE else "cpu"
    n = size or PROBE_SIZE[kind]
    matmuls = PROBE_MATMULS[kind]
    gen = torch.Generator(device="cpu").manual_seed(0)
    a_NN = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b_NN = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out_NN = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a_NN, b_NN, out=out_NN)  # warm-up: kernels chosen, pages touched
    _sync(device)
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        for _ in range(matmuls):
            torch.mm(a_NN, b_NN, out=out_NN)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return 2.0 * n**3 * matmuls / max(best, 1e-9) / 1e12


def probe_dtype(device: torch.device, bf16: bool) -> torch.dtype:
    """The probe's dtype: bf16 on a GPU training in bf16, else fp32."""
    return torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA max allocated, or the CPU max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB


def memory_kind(device: torch.device) -> str:
    """What :func:`peak_memory_mb` measures on ``device``, for the summary."""
    return "CUDA max allocated" if device.type == "cuda" else "max RSS"
