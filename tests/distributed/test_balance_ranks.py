"""Aux-loss-free bias over spawned gloo ranks: the replicas stay identical and equal a
single-process replay of the update from the counts summed over the ranks."""

from __future__ import annotations

import pytest
import torch

from tests.spawn import run_ranks
from turnout.config.model import ModelConfig, MoEConfig
from turnout.models.lm import TransformerLM
from turnout.models.moe import bias_step, moe_by_layer
from turnout.models.terms import Term
from turnout.parallel.expert_parallel import install_expert_parallel
from turnout.parallel.groups import build_groups
from turnout.trainer.balance import BiasBalancer

pytestmark = pytest.mark.distributed

STEPS, MICRO = 4, 2


def _cfg() -> ModelConfig:
    return ModelConfig(
        vocab_size=32, d_model=32, n_layers=2, n_heads=2, ffn_dim=32, max_seq_len=16,
        layer_pattern=["moe", "imode"],
        moe=MoEConfig(num_experts=4, num_noop_experts=1, balance="bias", bias_rate=0.1),
    )  # fmt: skip


def _rank(rank: int, world: int, ep_size: int) -> dict:
    groups = build_groups(ep_size)
    torch.manual_seed(0)  # the same weights everywhere
    model = TransformerLM(_cfg())
    install_expert_parallel(model, groups)
    bal = BiasBalancer(model)
    g = torch.Generator().manual_seed(100 + rank)  # different tokens on every rank
    local: list[dict[int, torch.Tensor]] = []
    for _ in range(STEPS):
        step_counts: dict[int, torch.Tensor] = {}
        for _ in range(MICRO):
            out = model(torch.randint(0, 32, (2, 16), generator=g))
            bal.add(out)
            for i in (0, 1):
                c = out.stats[i][Term.MOE_COUNTS].double()
                step_counts[i] = step_counts.get(i, 0) + c
        local.append(step_counts)
        bal.step()
    biases = {i: m.expert_bias.clone() for i, m in moe_by_layer(model).items()}
    return {"local": local, "bias": biases}


@pytest.mark.parametrize("ep_size", [1, 2])
def test_replicas_stay_identical_and_follow_the_global_counts(ep_size: int) -> None:
    results = run_ranks(_rank, 2, ep_size)
    a, b = results
    for i in (0, 1):
        assert torch.equal(a["bias"][i], b["bias"][i]), f"layer {i} replicas differ"
        assert a["bias"][i].dtype == torch.float32 and a["bias"][i].abs().sum() > 0
    # The ranks saw different loads, so a rank-local update would have diverged.
    assert any(not torch.equal(a["local"][s][0], b["local"][s][0]) for s in range(STEPS))
    rate = _cfg().moe.bias_rate
    for i in (0, 1):
        bias = torch.zeros(4)
        for s in range(STEPS):
            bias = bias_step(bias, a["local"][s][i] + b["local"][s][i], rate)
        assert torch.equal(a["bias"][i], bias), f"layer {i}"
