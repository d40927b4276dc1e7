"""Rank arithmetic of world = dp x ep, checked without starting processes."""

from __future__ import annotations

import pytest

from turnout.errors import ConfigError
from turnout.parallel.expert_parallel import mark_expert_param, split_expert_param_groups
from turnout.parallel.groups import Layout

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "world,ep", [(1, 1), (2, 1), (2, 2), (4, 2), (8, 2), (8, 4), (6, 3), (16, 8)]
)
def test_groups_partition_the_world(world: int, ep: int) -> None:
    lay = Layout(world, ep)
    assert lay.dp * lay.ep == world
    ep_groups, edp_groups = lay.all_ep_groups(), lay.all_edp_groups()
    # Each family partitions the world exactly once.
    assert sorted(r for g in ep_groups for r in g) == list(range(world))
    assert sorted(r for g in edp_groups for r in g) == list(range(world))
    assert all(len(g) == ep for g in ep_groups) and len(ep_groups) == lay.dp
    assert all(len(g) == lay.dp for g in edp_groups) and len(edp_groups) == ep
    for rank in range(world):
        mine_ep, mine_edp = lay.ep_ranks(rank), lay.edp_ranks(rank)
        assert mine_ep in ep_groups and mine_edp in edp_groups
        # An EP group and an EDP group meet in exactly one rank.
        assert set(mine_ep) & set(mine_edp) == {rank}
        assert mine_ep[lay.ep_rank(rank)] == rank
        assert mine_edp[lay.edp_rank(rank)] == rank
        # Ranks of one EDP group hold the same experts; an EP group holds all experts once.
        assert {lay.expert_slice(r, 8 * ep) for r in mine_edp} == {lay.expert_slice(rank, 8 * ep)}
        covered = sorted(
            e
            for r in mine_ep
            for e in range(lay.expert_slice(r, 8 * ep)[0], sum(lay.expert_slice(r, 8 * ep)))
        )
        assert covered == list(range(8 * ep))


def test_deepspeed_layout_and_name() -> None:
    # DeepSpeed's docstring example (world 16, ep 2) and its group-name convention.
    lay = Layout(16, 2)
    assert lay.all_ep_groups()[:3] == [[0, 1], [2, 3], [4, 5]]
    assert lay.all_edp_groups() == [list(range(0, 16, 2)), list(range(1, 16, 2))]
    assert lay.name == "ep_size_2"
    assert Layout(4, 2).expert_slice(3, 8) == (4, 4)


@pytest.mark.parametrize(
    "world,ep,num_experts,key",
    [(4, 3, 6, "parallel.ep_size"), (4, 0, 4, "parallel.ep_size"), (4, 2, 5, "parallel.ep_size")],
)
def test_bad_layouts_name_the_key(world: int, ep: int, num_experts: int, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        Layout(world, ep).expert_slice(0, num_experts)
    assert key in str(err.value)


def test_rank_outside_world_rejected() -> None:
    with pytest.raises(ValueError):
        Layout(4, 2).ep_rank(4)


def test_split_expert_param_groups() -> None:
    import torch

    dense = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    experts = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    for p in experts:
        mark_expert_param(p, "ep_size_2")
    groups = split_expert_param_groups(
        [
            {"params": [dense[0], experts[0]], "weight_decay": 0.1},
            {"params": [dense[1], experts[1]], "weight_decay": 0.0},
        ]
    )
    assert [len(g["params"]) for g in groups] == [1, 1, 1, 1]
    moe = [g for g in groups if g.get("moe")]
    assert [g["name"] for g in moe] == ["ep_size_2", "ep_size_2"]
    assert [g["weight_decay"] for g in moe] == [0.1, 0.0]
    assert moe[0]["params"][0] is experts[0] and moe[1]["params"][0] is experts[1]
    assert all(not g.get("moe") for g in groups[:2])
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in dense + experts}
