"""2 data-parallel ranks through the real DeepSpeed engine == 1 process on the combined batch.

The ranks run ``turnout.trainer.engine.build_engine`` (ZeRO-1 / ZeRO-2, fp32, gradient
accumulation 2, clipping active, warmup+cosine lr) for 3 optimizer steps; each rank
draws its own slots' windows from the real ``BatchSampler``. The reference is a
single process with a plain ``torch.optim.AdamW`` over the same param groups, the same
LambdaLR and ``clip_grad_norm_``, stepping once per optimizer step on ONE forward of
the combined batch (all ranks' and all micro steps' sequences concatenated). A plain
torch reference (rather than DeepSpeed at world 1) checks independently that the
engine averages gradients over ranks and micro steps, clips the global norm and steps
the schedule exactly like textbook AdamW would.

Why the combined batch gives the same loss: cross-entropy, router z-loss and the MoD
predictor BCE are means over tokens and every micro batch has the same token count,
so their mean over micro batches equals the mean over the concatenation; MoD top-k is
per sequence; the MoE layers are dropless (ZeRO-2 case) or have capacity_factor =
E / k, i.e. C = T, which no expert can exceed since a token picks distinct experts
(ZeRO-1 case), so the per-rank T (half the combined T) never changes which tokens drop.
The load-balance loss E * sum_e f_e P_e is a product of batch means (not a mean over
tokens), so every framework computes it per rank / micro batch and it cannot equal the
combined-batch value: its coefficient is 0 here (it is covered by the routing tests).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.decisions import recorded
from tests.margins import assert_clear
from tests.spawn import run_ranks
from turnout.config import TurnoutConfig
from turnout.models.lm import TransformerLM
from turnout.parallel.groups import build_groups
from turnout.trainer.data.batches import BatchSampler, TokenData
from turnout.trainer.engine import build_engine, optimizer_param_groups
from turnout.trainer.schedule import build_scheduler

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3


def _config(zero_stage: int, capacity_factor: float | None) -> TurnoutConfig:
    cfg = TurnoutConfig()
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.ffn_dim, m.max_seq_len = 32, 2, 2, 64, 16
    m.layer_pattern = ["mode", "moe"]
    m.moe.num_experts, m.moe.top_k, m.moe.expert_ffn_dim = 4, 2, 32
    m.moe.capacity_factor = capacity_factor
    m.moe.aux_loss_coef = 0.0  # see the module docstring
    m.moe.z_loss_coef = 1e-3
    m.mod.capacity = 0.5
    # The ranks route micro batches of 2 sequences, the reference the combined 8: router
    # GEMMs of other row counts, and weights equal only to float rounding after step 1.
    # init_std 0.2 makes the MoD and expert scores of order 1 (at the default 0.02 the MoD
    # scores of block 0 are ~1e-3 and their top-8 cuts sit ~5e-6 from ties); with seed 7
    # every decision of the reference's 3 steps is at least 5e-4 from a tie (checked).
    m.init_std = 0.2
    t = cfg.train
    t.micro_batch_size, t.grad_accum, t.steps = 2, 2, STEPS
    t.lr, t.min_lr, t.warmup_steps, t.weight_decay = 1e-2, 1e-3, 1, 0.1
    t.grad_clip, t.precision, t.seed = 0.5, "fp32", 7
    cfg.parallel.zero_stage = zero_stage
    cfg.launch.num_workers = WORLD
    return cfg


def _tokens() -> TokenData:
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 256, size=4096, dtype=np.uint8)
    return TokenData(train=stream[:3500], val=stream[3500:], vocab_size=256, path=Path("."))


def _sampler(cfg: TurnoutConfig, rank: int) -> BatchSampler:
    t = cfg.train
    return BatchSampler(_tokens(), cfg.model.max_seq_len, t.micro_batch_size, rank, WORLD, t.seed)


def _rank(rank: int, world: int, cfg: TurnoutConfig) -> dict:
    torch.manual_seed(cfg.train.seed)
    model = TransformerLM(cfg.model)
    engine, scheduler = build_engine(model, cfg, build_groups(cfg.parallel.ep_size))
    sampler = _sampler(cfg, rank)
    lrs, losses, norms = [], [], []
    for step in range(STEPS):
        lrs.append(scheduler.get_last_lr()[0])
        step_loss = 0.0
        for micro in range(cfg.train.grad_accum):
            tokens, targets = sampler.batch(step, micro)
            out = engine(tokens, targets)
            step_loss += float(out.loss) / cfg.train.grad_accum
            engine.backward(out.loss)
            engine.step()
        losses.append(step_loss)
        norms.append(float(engine.get_global_grad_norm()))
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {"params": params, "lrs": lrs, "losses": losses, "norms": norms}


def _reference(cfg: TurnoutConfig) -> dict:
    t = cfg.train
    torch.manual_seed(t.seed)
    model = TransformerLM(cfg.model)
    opt = torch.optim.AdamW(
        optimizer_param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=1e-8
    )
    scheduler = build_scheduler(opt, t.lr, t.min_lr, t.warmup_steps, t.steps)
    samplers = [_sampler(cfg, r) for r in range(WORLD)]
    lrs, losses, norms, gaps = [], [], [], []
    for step in range(STEPS):
        lrs.append(scheduler.get_last_lr()[0])
        pairs = [s.batch(step, m) for s in samplers for m in range(t.grad_accum)]
        tokens = torch.cat([p[0] for p in pairs])
        targets = torch.cat([p[1] for p in pairs])
        opt.zero_grad()
        with recorded(model) as decisions:
            loss = model(tokens, targets).loss
        gaps.append(decisions.min_gap())
        losses.append(float(loss))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)))
        opt.step()
        scheduler.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "lrs": lrs, "losses": losses, "norms": norms, "gaps": gaps}


@pytest.mark.parametrize(
    "zero_stage, capacity_factor",
    [(2, None), (1, 2.0)],
    ids=["zero2-dropless", "zero1-capacity-C=T"],
)
def test_two_ranks_equal_one_rank_on_combined_batch(
    zero_stage: int, capacity_factor: float | None
) -> None:
    cfg = _config(zero_stage, capacity_factor)
    ref = _reference(copy.deepcopy(cfg))
    assert_clear(min(ref["gaps"]), "the reference's MoD top-8 and expert top-2")
    results = run_ranks(_rank, WORLD, cfg)
    # The clip must be active for the test to cover it.
    assert min(ref["norms"]) > cfg.train.grad_clip
    torch.manual_seed(cfg.train.seed)
    initial = dict(TransformerLM(cfg.model).named_parameters())
    # Forward: the mean of the ranks' losses is the combined batch's loss, every step.
    rank_mean = [sum(r["losses"][s] for r in results) / WORLD for s in range(STEPS)]
    # fp32 means over 2 vs 8 sequences and weights equal to rounding: ~1e-7 relative.
    assert rank_mean == pytest.approx(ref["losses"], rel=1e-5)
    # Adam is invariant to the gradient's scale, so the parameters alone would not catch
    # a missing 1/world or 1/grad_accum: the global grad norm (before clipping) does.
    for res in results:
        assert res["norms"] == pytest.approx(ref["norms"], rel=1e-5)  # as the losses
        assert res["lrs"] == pytest.approx(ref["lrs"], rel=1e-12)  # the same float64 formula
        assert res["params"].keys() == ref["params"].keys()
        for name, expected in ref["params"].items():
            got = res["params"][name]
            # Every parameter moved, and it moved to the reference's value. Adam divides
            # by sqrt(v): for a coordinate whose gradient is near zero, float summation
            # order noise is amplified up to the size of one update (~lr), so the
            # absolute tolerance is 3e-3 of one update, the relative one 1e-5 (seen: 1.4e-3
            # of an update on the embedding row of a byte the batches hold once).
            assert not torch.equal(expected, initial[name].detach()), name
            atol = 3e-3 * cfg.train.lr
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol, msg=name)
    # Both ranks hold identical replicas.
    for name in ref["params"]:
        assert torch.equal(results[0]["params"][name], results[1]["params"][name]), name
