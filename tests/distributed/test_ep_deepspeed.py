"""A few DeepSpeed ZeRO optimizer steps with expert parallelism == the single-process run.

DeepSpeed averages every gradient over the global data-parallel size W (dense: all-reduce
over all ranks / W; experts: reduced over the expert-data-parallel group only, also / W).
Rank r's local expert gradient already sums the contributions of every rank in its EP
group (the backward all-to-all brings them home), and the EP x EDP groups tile the world,
so both become d/dtheta [(1/W) sum_r L_r]: the reference is one process that computes
each rank's loss on that rank's batch (same per-rank capacity), averages the W losses,
and takes the same optimizer step. SGD with momentum keeps the comparison linear in
the gradients (Adam's normalisation would amplify float noise on near-zero gradients).

Routing decisions are discrete, so the data must keep every one of them clear of a tie:
the reference records the MoD top-k cut and the MoE top-2 cut of every forward and checks
their margins (``ROUTING_MARGIN``). With the batches of seed 0, one MoD cut at step 2 was
a tie (gap 0 dropless, 6e-11 with capacity): the reference itself, summing the four ranks'
losses in another order, then moved ``embed.weight`` by 1.4e-2, and so did four ranks on
some CPUs. That was the test's data, not ZeRO-3: on clear data the reference's own spread
under a permuted rank order is 4e-8 (parameters) and 1e-9 (router scores).
"""

from __future__ import annotations

import pytest
import torch

from tests.decisions import recorded
from tests.spawn import run_ranks
from tests.tiny import tiny_mode_cfg
from turnout.models.lm import TransformerLM
from turnout.parallel.groups import Layout

pytestmark = pytest.mark.distributed

B, S, STEPS, LR = 2, 8, 3, 0.5
# The first seed (of 0, 1000, 2000) whose batches keep every routing cut of every case in
# this file clear of ROUTING_MARGIN (smallest gap 3.5e-5).
DATA_SEED = 2000
# A fresh router's scores are ~3e-3 here; a permuted reduction order moves them by ~1e-9.
ROUTING_MARGIN = 1e-6
# Parameters after three steps: the reference's own spread under a permuted rank order is
# 4e-8 (max abs); 1e-5 leaves ~250x for gloo's order and DeepSpeed's flat-buffer averaging.
RTOL, ATOL = 1e-4, 1e-5


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(DATA_SEED + 1000 * step + rank)
    tok = torch.randint(0, 32, (B, S + 1), generator=gen)
    return tok[:, :-1], tok[:, 1:]


def _optimizer(param_groups: list) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups, lr=LR, momentum=0.9)


def _ds_worker(rank: int, world: int, zero_stage: int, cf: float | None) -> dict:
    import deepspeed

    from turnout.parallel.expert_parallel import (
        install_expert_parallel,
        prepare_for_deepspeed,
        split_expert_param_groups,
    )
    from turnout.parallel.groups import build_groups
    from turnout.trainer.engine import quiet_deepspeed

    groups = build_groups(2)
    torch.manual_seed(0)
    model = TransformerLM(tiny_mode_cfg(cf, 0.5, S))
    install_expert_parallel(model, groups)
    prepare_for_deepspeed(model, groups, zero_stage)
    param_groups = split_expert_param_groups([{"params": list(model.parameters())}])
    config = {
        "train_micro_batch_size_per_gpu": B,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    quiet_deepspeed()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=_optimizer(param_groups), config=config
    )
    assert engine.has_moe_layers
    for step in range(STEPS):
        tokens, targets = _batch(step, rank)
        loss = engine(tokens, targets).loss
        engine.backward(loss)
        engine.step()
    out = {}
    for n, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=zero_stage == 3):
            out[n] = p.detach().clone()
    return out


def _reference(world: int, cf: float | None) -> dict:
    torch.manual_seed(0)
    model = TransformerLM(tiny_mode_cfg(cf, 0.5, S))
    opt = _optimizer([{"params": list(model.parameters())}])
    with recorded(model) as decisions:
        for step in range(STEPS):
            opt.zero_grad()
            loss = sum(model(*_batch(step, r)).loss for r in range(world)) / world
            loss.backward()
            opt.step()
    decisions.assert_clear(f"routing cuts, world {world}", ROUTING_MARGIN)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _compare(results: list[dict], ref: dict, world: int) -> None:
    lay = Layout(world, 2)
    torch.manual_seed(0)
    init = dict(TransformerLM(tiny_mode_cfg(None, 0.5, S)).named_parameters())
    for rank, got in enumerate(results):
        off, cnt = lay.expert_slice(rank, 4)
        assert set(got) == set(ref)
        for name, p in got.items():
            want = ref[name][off : off + cnt] if ".experts." in name else ref[name]
            torch.testing.assert_close(p, want, rtol=RTOL, atol=ATOL, msg=f"rank {rank} {name}")
            start = init[name][off : off + cnt] if ".experts." in name else init[name]
            assert not torch.equal(p, start), f"{name} did not train"


@pytest.mark.parametrize(
    "zero_stage,cf", [(1, 1.25), (2, 1.25), (2, None)], ids=["zero1", "zero2", "zero2-dropless"]
)
def test_deepspeed_steps_world2_ep2(zero_stage: int, cf: float | None) -> None:
    results = run_ranks(_ds_worker, 2, zero_stage, cf)
    _compare(results, _reference(2, cf), 2)


def test_deepspeed_steps_world4_dp2_ep2_zero2() -> None:
    results = run_ranks(_ds_worker, 4, 2, 1.25)
    _compare(results, _reference(4, 1.25), 4)


def test_deepspeed_zero3_world2_ep2() -> None:
    # ZeRO-3 on the dense params; experts ride DeepSpeed's AutoEP placement (partitioned
    # over the expert-data-parallel group, here of size 1).
    results = run_ranks(_ds_worker, 2, 3, 1.25)
    _compare(results, _reference(2, 1.25), 2)


@pytest.mark.slow
@pytest.mark.parametrize("cf", [1.25, None], ids=["capacity", "dropless"])
def test_deepspeed_zero3_world4_dp2_ep2(cf: float | None) -> None:
    # Experts partitioned over an expert-data-parallel group of 2 (about 60 s on 2 cores).
    results = run_ranks(_ds_worker, 4, 3, cf)
    _compare(results, _reference(4, cf), 4)
