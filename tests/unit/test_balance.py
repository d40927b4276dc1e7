"""Aux-loss-free balancing: the selection bias, its update, and what it must not touch."""

from __future__ import annotations

import pytest
import torch

from turnout.config.model import ModelConfig, MoEConfig, validate_model
from turnout.errors import ConfigError
from turnout.models import kernels, ops
from turnout.models import routing as ref
from turnout.models.lm import TransformerLM
from turnout.models.moe import MoELayer, bias_step, moe_by_layer
from turnout.models.terms import TERMS, Term
from turnout.trainer.balance import BiasBalancer

pytestmark = pytest.mark.unit


def _skewed_layer(balance: str, rate: float, noop: int = 0) -> tuple[MoELayer, torch.Tensor]:
    """A layer whose router sends almost every token to expert 0, and its tokens."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=None, balance=balance, bias_rate=rate)
    moe = MoELayer(16, 8, cfg, num_noop=noop)
    x_TD = torch.randn(512, 16)
    x_TD[:, 0] = 1.0  # a shared direction every token has
    with torch.no_grad():
        moe.router_DE.normal_(std=0.5)  # tokens differ in what they prefer ...
        moe.router_DE[0, 0] = 3.0  # ... but the shared direction favours expert 0
        moe.router_DE[0, 1] = 1.5
    return moe, x_TD


def _max_over_mean(counts_R: torch.Tensor) -> float:
    c = counts_R.double()
    return float(c.max() / c.mean())


@pytest.mark.parametrize("noop", [0, 2])
def test_repeated_updates_flatten_a_skewed_load_without_the_aux_loss(noop: int) -> None:
    moe, x_TD = _skewed_layer("bias", rate=0.05, noop=noop)
    assert TERMS[Term.MOE_LB].coefficient(ModelConfig(moe=moe.cfg)) == 0.0
    history = []
    with torch.no_grad():
        for _ in range(150):
            _, aux = moe(x_TD)
            history.append(_max_over_mean(aux.counts_E))
            moe.update_bias(aux.counts_E)
    assert history[0] > 3.0  # really skewed at the start
    assert history[-1] < 1.15  # near balanced at the end (sign steps oscillate around it)
    assert max(history[-20:]) < 1.2
    assert moe.expert_bias is not None and moe.expert_bias.dtype == torch.float32
    assert abs(float(moe.expert_bias.sum())) < 1e-4  # centred


def test_without_bias_the_skew_stays() -> None:
    moe, x_TD = _skewed_layer("aux", rate=0.05)
    assert moe.expert_bias is None and "expert_bias" not in moe.state_dict()
    with torch.no_grad():
        for _ in range(20):
            _, aux = moe(x_TD)
            moe.update_bias(aux.counts_E)  # a no-op without a bias
    assert _max_over_mean(aux.counts_E) > 3.0


def test_bias_changes_the_choice_not_the_gates() -> None:
    torch.manual_seed(1)
    logits_TE = torch.randn(64, 6, requires_grad=True)
    bias_R = torch.tensor([2.0, -1.0, 0.5, 0.0, -0.5])  # 5 real experts + 1 no-op column
    plan = ref.moe_plan(logits_TE, 2, None, True, 5, bias_R)
    plain = ref.moe_plan(logits_TE, 2, None, True, 5)
    assert not torch.equal(plan.expert_TK, plain.expert_TK)
    # The choice is the top-k of the biased logits; the no-op column gets no bias.
    biased_TE = logits_TE.detach() + torch.cat([bias_R, torch.zeros(1)])
    assert torch.equal(plan.expert_TK, ref.topk_stable(biased_TE.softmax(-1), 2)[1])
    # The gates are the unbiased probabilities of the chosen columns, renormalised.
    p_TK = logits_TE.detach().softmax(-1).gather(1, plan.expert_TK)
    torch.testing.assert_close(plan.gate_TK.detach(), p_TK / p_TK.sum(-1, keepdim=True))
    # A zero bias is exactly no bias.
    zero = ref.moe_plan(logits_TE, 2, 3, True, 5, torch.zeros(5))
    same = ref.moe_plan(logits_TE, 2, 3, True, 5)
    for name in ("expert_TK", "gate_TK", "slot_TK", "keep_TK", "counts_E"):
        assert torch.equal(getattr(zero, name), getattr(same, name)), name
    # Gates keep their gradient to the logits; the bias is not a trained value.
    plan.gate_TK.sum().backward()
    assert logits_TE.grad is not None and logits_TE.grad.abs().sum() > 0


@pytest.mark.parametrize("noop", [0, 1])
def test_fused_kernels_take_the_bias_like_the_reference(noop: int) -> None:
    assert kernels.load(), "csrc/ kernels failed to build"
    torch.manual_seed(2)
    E_real = 6
    logits_TE = torch.randint(-2, 3, (80, E_real + noop)).float()  # many ties
    bias_R = torch.randint(-2, 3, (E_real,)).float() * 0.5
    for cap in (None, 20):
        a = ops.moe_plan(logits_TE, 2, cap, True, E_real, bias_R)
        b = ref.moe_plan(logits_TE, 2, cap, True, E_real, bias_R)
        for name in ("expert_TK", "slot_TK", "keep_TK", "counts_E", "gate_TK"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    scores_BS = torch.randn(4, 20)
    idx, chosen, fused = ops.mode_plan(scores_BS, 5, logits_TE, 2, 12, True, E_real, bias_R)
    rows_T = ref.chosen_rows(ref.mod_select(scores_BS, 5)[0], 20)
    expect = ref.moe_plan(logits_TE[rows_T], 2, 12, True, E_real, bias_R)
    for name in ("expert_TK", "slot_TK", "keep_TK", "counts_E", "gate_TK"):
        assert torch.equal(getattr(fused, name), getattr(expect, name)), name


def test_bias_step_moves_toward_the_mean_and_stays_centred() -> None:
    bias = torch.zeros(4)
    new = bias_step(bias, torch.tensor([10, 2, 2, 2]), 0.1)
    # Raw steps -0.1, +0.1, +0.1, +0.1 (mean +0.05) become -0.15, +0.05, +0.05, +0.05.
    torch.testing.assert_close(new, torch.tensor([-0.15, 0.05, 0.05, 0.05]))
    assert new.dtype == torch.float32
    assert torch.equal(bias_step(new, torch.tensor([4, 4, 4, 4]), 0.1), new)  # balanced: no move


def test_bias_stays_fp32_under_bf16_and_is_a_persistent_buffer() -> None:
    cfg = ModelConfig(
        vocab_size=32, d_model=32, n_layers=2, n_heads=2, ffn_dim=32, max_seq_len=16,
        layer_pattern=["moe", "imode"],
        moe=MoEConfig(num_experts=4, num_noop_experts=1, balance="both"),
    )  # fmt: skip
    model = TransformerLM(cfg)
    layers = moe_by_layer(model)
    assert sorted(layers) == [0, 1]
    layers[1].update_bias(torch.tensor([9.0, 1.0, 1.0, 1.0]))
    before = layers[1].expert_bias.clone()
    model.bfloat16()
    for moe in layers.values():
        assert moe.expert_bias.dtype == torch.float32
        assert moe.expert_bias.shape == (4,)  # real experts only, not the no-op column
    assert torch.equal(layers[1].expert_bias, before)  # exactly, not via a bf16 round trip
    assert model.layers[0].moe().router_DE.dtype == torch.bfloat16
    state = model.state_dict()
    assert {"layers.0.ffn.expert_bias", "layers.1.ffn.expert_bias"} <= set(state)
    fresh = TransformerLM(cfg)
    fresh.load_state_dict(state)
    assert torch.equal(moe_by_layer(fresh)[1].expert_bias, before)


def test_balancer_sums_micro_steps_and_updates_only_biased_layers() -> None:
    cfg = ModelConfig(
        vocab_size=32, d_model=32, n_layers=3, n_heads=2, ffn_dim=32, max_seq_len=16,
        layer_pattern=["dense", "moe"], moe=MoEConfig(num_experts=4, balance="bias"),
    )  # fmt: skip
    model = TransformerLM(cfg)
    bal = BiasBalancer(model)
    assert sorted(bal.layers) == [1]
    tokens = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        outs = [model(tokens), model(tokens)]
    for out in outs:
        bal.add(out)
    used = bal.step()  # world 1: the all-reduce is the identity
    counts = outs[0].stats[1][Term.MOE_COUNTS] * 2
    assert torch.equal(used[1], counts.double())
    expect = bias_step(torch.zeros(4), counts, cfg.moe.bias_rate)
    assert torch.equal(moe_by_layer(model)[1].expert_bias, expect)
    assert not bal.counts  # a new step starts empty
    assert not BiasBalancer(TransformerLM(ModelConfig(layer_pattern=["moe"]))).active


@pytest.mark.parametrize(
    ("key", "moe"),
    [
        ("model.moe.balance", MoEConfig(balance="loss-free")),
        ("model.moe.bias_rate", MoEConfig(balance="bias", bias_rate=0.0)),
        ("model.moe.bias_rate", MoEConfig(bias_rate=float("nan"))),
    ],
)
def test_bad_balance_keys_are_named(key: str, moe: MoEConfig) -> None:
    with pytest.raises(ConfigError) as err:
        validate_model(ModelConfig(layer_pattern=["moe"], moe=moe))
    assert err.value.key == key
