"""Parallel layout configuration: world = dp x ep, DeepSpeed ZeRO stage, backend."""

from __future__ import annotations

from dataclasses import dataclass

from turnout.config.choices import Backend
from turnout.errors import ConfigError


@dataclass
class ParallelConfig:
    ep_size: int = 1
    """Expert-parallel group size; experts are split evenly over its ranks."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage for the dense parameters: 0, 1, 2 or 3."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl with CUDA, else gloo), 'gloo' or 'nccl'."""
    timeout_s: float = 300.0
    """How long a rank waits in a collective for the others before the job fails with a
    line naming the rank and the collective."""


def validate_parallel(
    cfg: ParallelConfig, num_experts: int, world_size: int, uses_moe: bool
) -> None:
    if cfg.ep_size < 1:
        raise ConfigError("parallel.ep_size", f"must be >= 1, got {cfg.ep_size}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero_stage", f"must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if not (0 < cfg.timeout_s < float("inf")):
        raise ConfigError("parallel.timeout_s", f"must be > 0 seconds, got {cfg.timeout_s}")
    if cfg.backend not in Backend.values():
        raise ConfigError("parallel.backend", f"must be {Backend.spelled()}, got {cfg.backend!r}")
    if uses_moe and num_experts % cfg.ep_size:
        raise ConfigError(
            "parallel.ep_size",
            f"num_experts={num_experts} is not divisible by ep_size={cfg.ep_size}",
        )
    if world_size % cfg.ep_size:
        raise ConfigError(
            "parallel.ep_size",
            f"world size {world_size} (launch.num_workers) is not divisible "
            f"by ep_size={cfg.ep_size}",
        )
