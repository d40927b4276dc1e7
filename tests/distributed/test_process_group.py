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


def _listeners(rank: int, world: int) -> tuple[list[str], str, float]:
    import socket

    import psutil
    import torch

    from turnout.parallel.dist import all_reduce_sum

    total = float(all_reduce_sum(torch.ones(1)).item())  # the group works
    found = [
        c.laddr.ip
        for c in psutil.Process().net_connections("inet")
        if c.laddr and c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN
    ]
    import os

    return found, os.environ.get("GLOO_SOCKET_IFNAME", ""), total


def test_a_loopback_rendezvous_listens_on_loopback_only() -> None:
    from turnout.parallel.dist import interface_of, is_loopback

    results = run_ranks(_listeners, 2)  # MASTER_ADDR=127.0.0.1 (tests/spawn.py)
    assert results[0][0], "rank 0 holds the store: it listens somewhere"
    for found, ifname, total in results:
        assert total == 2.0
        assert ifname == interface_of("127.0.0.1")
        assert all(is_loopback(ip) for ip in found), found
