"""The run's FLOP accounting, the MFU arithmetic, the peak probe and peak memory."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from turnout.config.load import load_config
from turnout.models.flops import dense_counterpart, forward_flops
from turnout.trainer.meter import mfu, model_tflops
from turnout.trainer.metrics.compute import (
    peak_memory_mb,
    probe_dtype,
    probe_peak_tflops,
    run_flops,
)

pytestmark = pytest.mark.unit


def test_model_tflops_and_mfu_arithmetic() -> None:
    # 6e6 training FLOPs per token at 50,000 tokens/s over all ranks: 0.3 TFLOP/s.
    assert model_tflops(6e6, 50_000.0) == pytest.approx(0.3)
    # Two ranks of 0.5 TFLOP/s peak each: 0.3 / (0.5 * 2) = 30%.
    assert mfu(0.3, 0.5, 2) == pytest.approx(0.3)
    assert mfu(0.3, 0.5, 1) == pytest.approx(0.6)
    assert math.isnan(mfu(0.3, 0.0, 2))  # no peak, no MFU
    assert model_tflops(6e6, 0.0) == 0.0


def test_run_flops_is_three_forwards_on_the_run_micro_batch() -> None:
    cfg = load_config("tiny", ["train.micro_batch_size=4", "model.max_seq_len=64"])
    flops = run_flops(cfg)
    fwd = forward_flops(cfg.model, 64, 4)
    dense = forward_flops(dense_counterpart(cfg.model), 64, 4)
    assert flops.per_token == pytest.approx(fwd.train_per_token)
    assert flops.per_token == pytest.approx(3 * fwd.per_token)
    assert flops.dense_per_token == pytest.approx(dense.train_per_token)
    # The tiny preset routes around half its blocks' positions: it saves compute.
    assert 0.3 < flops.fraction_of_dense < 0.9
    # A dense model is its own dense counterpart.
    plain = run_flops(load_config("tiny", ["model.layer_pattern=[dense]"]))
    assert plain.fraction_of_dense == pytest.approx(1.0)
    # One process (ep 1) computes the same kept rows as the expert exchange (ep 2).
    local = load_config("tiny", ["parallel.ep_size=1", "launch.num_workers=1"])
    assert run_flops(local).per_token == pytest.approx(forward_flops(local.model).train_per_token)
    assert run_flops(local).per_token == run_flops(load_config("tiny")).per_token


def test_the_default_job_saves_compute_against_dense() -> None:
    """The tiny preset's shape is chosen so the summary shows MoD/MoE saving FLOPs."""
    cfg = load_config("tiny")
    assert cfg.model.max_seq_len >= 256  # long enough for the routed attention to matter
    assert 0.5 < run_flops(cfg).fraction_of_dense < 0.7


def test_probe_measures_a_positive_finite_peak_in_bounded_time() -> None:
    dev = torch.device("cpu")
    t0 = time.perf_counter()
    peak = probe_peak_tflops(dev, size=256, repeats=50, budget_s=0.5)
    spent = time.perf_counter() - t0
    assert math.isfinite(peak) and peak > 0
    # A CPU core does well under 10 TFLOP/s fp32; the probe is no wild overestimate.
    assert peak < 10.0
    assert spent < 5.0  # the budget stops the repeats early (with slack for a busy machine)
    # The default size fits the budget too.
    t0 = time.perf_counter()
    assert probe_peak_tflops(dev, budget_s=1.0) > 0
    assert time.perf_counter() - t0 < 15.0


def test_probe_dtype_is_bf16_only_on_a_gpu_training_in_bf16() -> None:
    assert probe_dtype(torch.device("cpu"), bf16=True) == torch.float32
    assert probe_dtype(torch.device("cuda", 0), bf16=True) == torch.bfloat16
    assert probe_dtype(torch.device("cuda", 0), bf16=False) == torch.float32


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_is_the_max_resident_set_of_this_process() -> None:
    block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    assert float(block[::4096].sum()) == block[::4096].numel()
    peak = peak_memory_mb(torch.device("cpu"))
    assert peak >= 256
    # The kernel's own high-water mark of the resident set, read independently: the same
    # counter (ru_maxrss, VmHWM) read at two moments; 8 MiB covers what the interpreter may
    # touch between the reads, far below the 256 MiB block.
    assert peak == pytest.approx(_vm_hwm_mib(), abs=8.0)
