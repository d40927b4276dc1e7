"""Process groups for expert parallelism: world = dp x ep.

Layout (the same as DeepSpeed's default "E + D" ordering, so its engine can use our
groups unchanged):

- expert-parallel (EP) groups are blocks of ``ep`` consecutive ranks
  ``[i*ep, ..., i*ep + ep - 1]``; the experts of a MoE layer are split evenly and
  contiguously over one such group (EP rank ``j`` holds experts ``j*E/ep .. (j+1)*E/ep - 1``);
- expert-data-parallel (EDP) groups are the ranks holding the same experts,
  ``[j, j + ep, j + 2*ep, ...]`` (``dp = world / ep`` ranks); expert gradients are reduced
  only there;
- the data-parallel group is every rank (dense parameters, ZeRO-sharded).

:class:`Layout` is pure rank arithmetic (testable without processes);
:func:`build_groups` creates the torch.distributed groups from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from turnout.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Rank arithmetic for ``world = dp x ep`` (no processes involved)."""

    world: int
    ep: int

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ConfigError("launch.num_workers", f"world size must be >= 1, got {self.world}")
        if self.ep < 1:
            raise ConfigError("parallel.ep_size", f"must be >= 1, got {self.ep}")
        if self.world % self.ep:
            raise ConfigError(
                "parallel.ep_size",
                f"world size {self.world} is not divisible by ep_size={self.ep}",
            )

    @property
    def dp(self) -> int:
        """Expert-data-parallel size: how many ranks hold each expert slice."""
        return self.world // self.ep

    @property
    def name(self) -> str:
        """Group name, DeepSpeed's convention (``param.group_name`` of expert params)."""
        return f"ep_size_{self.ep}"

    def _check(self, rank: int) -> None:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside world of {self.world}")

    def ep_rank(self, rank: int) -> int:
        self._check(rank)
        return rank % self.ep

    def edp_rank(self, rank: int) -> int:
        self._check(rank)
        return rank // self.ep

    def ep_ranks(self, rank: int) -> list[int]:
        """Global ranks of ``rank``'s expert-parallel group (ordered by EP rank)."""
        start = self.edp_rank(rank) * self.ep
        return list(range(start, start + self.ep))

    def edp_ranks(self, rank: int) -> list[int]:
        """Global ranks of ``rank``'s expert-data-parallel group (same experts)."""
        return list(range(self.ep_rank(rank), self.world, self.ep))

    def all_ep_groups(self) -> list[list[int]]:
        return [list(range(i * self.ep, (i + 1) * self.ep)) for i in range(self.dp)]

    def all_edp_groups(self) -> list[list[int]]:
        return [list(range(j, self.world, self.ep)) for j in range(self.ep)]

    def expert_slice(self, rank: int, num_experts: int) -> tuple[int, int]:
        """``(offset, count)`` of the experts ``rank`` holds."""
        if num_experts % self.ep:
            raise ConfigError(
                "parallel.ep_size",
                f"num_experts={num_experts} is not divisible by ep_size={self.ep}",
            )
        count = num_experts // self.ep
        return self.ep_rank(rank) * count, count


@dataclass
class ParallelGroups:
    """This rank's process groups (torch.distributed ``ProcessGroup`` handles)."""

    layout: Layout
    rank: int
    ep_group: Any
    edp_group: Any
    dp_group: Any

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def ep_size(self) -> int:
        return self.layout.ep

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank(self.rank)

    @property
    def name(self) -> str:
        return self.layout.name


def build_groups(ep_size: int) -> ParallelGroups:
    """Create the EP and EDP groups on an initialised default process group.

    Every rank must call this (``new_group`` is collective, and every rank creates every
    group in the same order).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("build_groups needs torch.distributed to be initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = Layout(world, ep_size)
    ep_group = edp_group = None
    for ranks in layout.all_ep_groups():
        g = dist.new_group(ranks)
        if rank in ranks:
            ep_group = g
    for ranks in layout.all_edp_groups():
        g = dist.new_group(ranks)
        if rank in ranks:
            edp_group = g
    return ParallelGroups(layout, rank, ep_group, edp_group, dist.group.WORLD)
