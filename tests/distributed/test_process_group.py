"""The process group is created once per process, by init_distributed, from the
rendezvous environment (here set by tests/spawn.py as torchrun or Ray would)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.spawn import run_ranks

pytestmark = pytest.mark.distributed


def _second_init(rank: int, world: int) -> tuple[int, int, str]:
    from turnout.parallel.dist import init_distributed
    from turnout.parallel.groups import build_groups

    # tests/spawn.py already called init_distributed for this rank.
    groups = build_groups(world)
    try:
        init_distributed("gloo")
    except RuntimeError as e:
        return dist.get_rank(), groups.ep_rank, str(e)
    return dist.get_rank(), groups.ep_rank, "second init accepted"


def test_second_init_is_refused_and_groups_follow_the_environment() -> None:
    results = run_ranks(_second_init, 2)
    assert [(rank, ep_rank) for rank, ep_rank, _ in results] == [(0, 0), (1, 1)]
    for _, _, message in results:
        assert message.startswith("torch.distributed is already initialised"), message
