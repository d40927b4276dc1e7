"""Activation checkpointing: gradients with and without it are equal, for every block kind.

A checkpointed block runs its forward again in the backward with the forward's routing
decisions replayed (models/recompute.py). The gradients (of the whole loss and of the
aux loss alone), the logits and the per-layer statistics must not change; the tests
also make sure the routing they cover really happens (capacity drops, ties, MoD skips).
"""

from __future__ import annotations

import pytest
import torch

from turnout.config.choices import Recompute
from turnout.config.model import (
    ExitConfig,
    MoDConfig,
    ModelConfig,
    MoEConfig,
    PonderConfig,
)
from turnout.models import recompute
from turnout.models.lm import LMOutput, TransformerLM
from turnout.models.moe import moe_layers
from turnout.models.terms import Term

pytestmark = pytest.mark.unit

B, S, V = 3, 12, 48


def _cfg(pattern: list[str], **kw: object) -> ModelConfig:
    base: dict[str, object] = dict(
        vocab_size=V,
        d_model=16,
        n_heads=2,
        ffn_dim=32,
        max_seq_len=S,
        n_layers=len(pattern),
        layer_pattern=pattern,
        # Capacity factor 0.5: a quarter of the assignments or more are dropped.
        moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5, min_capacity=1),
        mod=MoDConfig(capacity=0.5),
        init_std=0.2,
    )
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


CASES: dict[str, ModelConfig] = {
    "dense": _cfg(["dense", "dense"]),
    "moe": _cfg(["dense", "moe", "moe"]),
    "moe_dropless_bias": _cfg(
        ["moe", "moe"],
        moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=None, balance="both"),
    ),
    "mod": _cfg(["mod", "dense", "mod"]),
    "mode_ffn_router": _cfg(["dense", "mode"]),
    "mode_block_router": _cfg(
        ["mode", "mode"],
        moe=MoEConfig(
            num_experts=4, top_k=2, capacity_factor=0.5, min_capacity=1, router_input="block"
        ),
    ),
    "imode": _cfg(
        ["imode", "moe"],
        moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5, num_noop_experts=2),
    ),
    "ponder": _cfg(["dense", "ponder", "moe"], ponder=PonderConfig(max_steps=3)),
    "exit_layer_dropout": _cfg(
        ["dense", "moe", "dense", "mod"],
        exit=ExitConfig(layers=[1, 2], layer_dropout=0.5),
    ),
}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    tok = torch.randint(0, V, (B, S + 1), generator=gen)
    return tok[:, :-1], tok[:, 1:]


def _model(cfg: ModelConfig, mode: str) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    with torch.no_grad():  # a bias that moves the choice (balance 'bias' / 'both')
        for i, layer in enumerate(moe_layers(model)):
            if layer.expert_bias is not None:
                layer.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.2]) * (i + 1))
    model.set_activation_checkpointing(mode)
    model.train()
    return model


def _grads(model: TransformerLM, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(cfg: ModelConfig, mode: str, aux_only: bool = False) -> tuple[LMOutput, dict]:
    model = _model(cfg, mode)
    torch.manual_seed(5)  # layer dropout draws the same sequences in both runs
    out = model(*_batch())
    assert out.loss is not None and out.aux_loss is not None
    return out, _grads(model, out.aux_loss if aux_only else out.loss)


def _assert_equal_grads(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        # fp32: the recompute repeats the forward's arithmetic; only the gates' gradient
        # formula may round differently (autograd of gates_of vs the planner's backward).
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


# 'moe' on a model without MoE blocks is a config error (and would checkpoint nothing).
MODES = [
    (case, mode)
    for case, cfg in CASES.items()
    for mode in (Recompute.FULL.value, Recompute.MOE.value)
    if mode == Recompute.FULL or cfg.uses_moe()
]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize(("case", "mode"), MODES)
def test_gradients_equal_with_and_without_checkpointing(
    case: str, mode: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "reference":
        monkeypatch.setenv("TURNOUT_KERNELS", "0")
    cfg = CASES[case]
    ref_out, ref_grads = _run(cfg, Recompute.NONE.value)
    out, grads = _run(cfg, mode)
    # Bitwise: a checkpointed forward runs the same ops on the same inputs (and so takes the
    # same routing decisions; the recompute replays them rather than deciding again).
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=0, atol=0)
    _assert_equal_grads(grads, ref_grads)
    # Counters and aux terms come back once, equal to the plain forward's.
    assert len(out.stats) == len(ref_out.stats)
    for got, want in zip(out.stats, ref_out.stats, strict=True):
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    for name in ref_out.terms:
        torch.testing.assert_close(out.terms[name], ref_out.terms[name], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["moe", "mode_block_router", "imode", "mod"])
def test_aux_loss_gradient_is_equal_and_nonzero(case: str) -> None:
    cfg = CASES[case]
    _, ref_grads = _run(cfg, Recompute.NONE.value, aux_only=True)
    _, grads = _run(cfg, Recompute.FULL.value, aux_only=True)
    _assert_equal_grads(grads, ref_grads)
    # The routers (MoE: load-balance and z-loss) or the MoD predictor (its BCE) learn.
    learners = [g for n, g in grads.items() if "router_DE" in n or "predictor" in n]
    assert learners and all(float(g.abs().sum()) > 0 for g in learners)


def test_the_cases_route_as_claimed() -> None:
    """Capacity drops, MoD skips and no-op choices really happen (no vacuous pass)."""
    out, _ = _run(CASES["moe"], Recompute.NONE.value)
    assert all(float(out.stats[i][Term.MOE_DROP]) > 0.1 for i in (1, 2))
    out, _ = _run(CASES["mode_block_router"], Recompute.NONE.value)
    assert float(out.stats[0][Term.MOD_CAPACITY]) == 0.5
    assert float(out.stats[0][Term.MOE_DROP]) > 0
    out, _ = _run(CASES["imode"], Recompute.NONE.value)
    assert float(out.stats[0][Term.MOE_NOOP]) > 0


def test_ties_everywhere_replay_the_forward_choice() -> None:
    """A zero router: every expert logit and every MoD score ties; the lower index wins
    in the forward and the recompute takes that same choice."""
    cfg = _cfg(["mode", "moe"])
    grads = {}
    for mode in (Recompute.NONE.value, Recompute.FULL.value):
        model = _model(cfg, mode)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "router" in name:
                    p.zero_()
        out = model(*_batch())
        assert out.loss is not None
        grads[mode] = _grads(model, out.loss)
    _assert_equal_grads(grads[Recompute.FULL.value], grads[Recompute.NONE.value])


def test_recompute_replays_decisions_when_the_bias_moves_before_backward() -> None:
    """The expert bias is a buffer the step moves; if it moved between the forward and
    the backward, a recompute that routed again would choose other experts. The replay
    keeps the forward's choice, so the gradient is the plain forward's."""
    cfg = CASES["moe_dropless_bias"]
    ref_model = _model(cfg, Recompute.NONE.value)
    out = ref_model(*_batch())
    assert out.loss is not None
    want = _grads(ref_model, out.loss)
    model = _model(cfg, Recompute.FULL.value)
    out = model(*_batch())
    assert out.loss is not None
    with torch.no_grad():
        for layer in moe_layers(model):
            assert layer.expert_bias is not None
            layer.expert_bias.copy_(torch.tensor([-5.0, 5.0, -5.0, 5.0]))  # flips choices
    _assert_equal_grads(_grads(model, out.loss), want)


def test_tape_records_once_and_replays_in_order() -> None:
    tape = recompute.Tape()
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.tensor([len(calls)])

    with tape.active():
        first = recompute.decide("a", compute)
    with tape.active():
        again = recompute.decide("a", compute)
    assert len(calls) == 1 and torch.equal(first, again)
    with pytest.raises(recompute.RecomputeMismatch, match="'b'"), tape.active():
        recompute.decide("b", compute)
    with pytest.raises(recompute.RecomputeMismatch, match="0 of the forward's 1"), tape.active():
        pass
    assert recompute.current() is None


def test_no_checkpoint_without_grad_or_in_the_causal_pass() -> None:
    """Evaluation (no grad) and the causal decode-rule pass run the plain blocks."""
    cfg = CASES["mode_block_router"]
    model = _model(cfg, Recompute.FULL.value)
    plain = _model(cfg, Recompute.NONE.value)
    tokens, targets = _batch()
    with torch.no_grad():
        a, b = model(tokens, targets), plain(tokens, targets)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    a = model(tokens, targets, routing="causal")
    b = plain(tokens, targets, routing="causal")
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_which_blocks_each_mode_recomputes() -> None:
    from turnout.config.model import BLOCK_KINDS

    moe = {k for k, spec in BLOCK_KINDS.items() if recompute.recomputes(spec, "moe")}
    assert moe == {"moe", "mode", "imode"}
    assert all(recompute.recomputes(spec, "full") for spec in BLOCK_KINDS.values())
    assert not any(recompute.recomputes(spec, "none") for spec in BLOCK_KINDS.values())
    with pytest.raises(ValueError, match="'none', 'moe' or 'full'"):
        recompute.recomputes(BLOCK_KINDS["moe"], "all")


def test_config_refuses_unknown_modes_and_moe_without_moe_blocks() -> None:
    from turnout.config.load import load_config
    from turnout.errors import ConfigError

    with pytest.raises(ConfigError, match="train.activation_checkpointing.*'none', 'moe'"):
        load_config("tiny", ["train.activation_checkpointing=some"])
    with pytest.raises(ConfigError, match="train.activation_checkpointing.*has none"):
        load_config(
            "tiny", ["model.layer_pattern=[dense,mod]", "train.activation_checkpointing=moe"]
        )
    # ZeRO-3 is allowed: the recompute runs at the block's edge, before ZeRO-3 gathers
    # any inner module's weights for its backward (tests/distributed/test_recompute_ep.py).
    z3 = load_config("tiny", ["parallel.zero_stage=3", "train.activation_checkpointing=full"])
    assert (z3.parallel.zero_stage, z3.train.activation_checkpointing) == (3, "full")
    cfg = load_config("tiny", ["train.activation_checkpointing=full"])
    assert cfg.train.activation_checkpointing == "full"
