"""Early exit (models/exit.py): static training forward, the decode rule, KV propagation.

Shape legend: B batch, S sequence, P prompt, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from turnout.config.model import ExitConfig, MoDConfig, ModelConfig, MoEConfig, validate_model
from turnout.errors import ConfigError
from turnout.models.exit import confidence
from turnout.models.lm import TransformerLM
from turnout.models.mod import MoDBlock
from turnout.models.terms import Term

from ..decisions import recorded
from ..margins import assert_clear, clear_threshold, min_gap, threshold_gap

pytestmark = pytest.mark.unit

V, S = 64, 12
# Decode and the full forward run other GEMM shapes on width-32 fp32 states: their logits
# agree to ~1e-6; 1e-5 leaves 10x, and a flipped exit or MoD decision moves logits by ~1e-2.
TOL = 1e-5
PREDICTOR_SCALE = 1e3


def _cfg(pattern: list[str], layers: list[int], **exit_kw: object) -> ModelConfig:
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=4,
        n_heads=4,
        ffn_dim=48,
        max_seq_len=16,
        layer_pattern=pattern,
        moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=None, min_capacity=1),
        mod=MoDConfig(capacity=0.5),
        exit=ExitConfig(layers=layers, **exit_kw),  # type: ignore[arg-type]
    )
    validate_model(cfg)
    return cfg


def _model(pattern: list[str] = ["dense"], layers: list[int] = [1, 2], **kw: object):  # noqa: B006
    torch.manual_seed(0)
    model = TransformerLM(_cfg(pattern, layers, **kw)).eval()
    with torch.no_grad():
        for layer in model.layers:
            if isinstance(layer, MoDBlock) and layer.predictor is not None:
                # A fresh predictor's logits are ~1e-4, so every MoD decision of the decode
                # rule is a near tie; a trained one's are of order 1. Scale it there.
                layer.predictor[-1].weight.mul_(PREDICTOR_SCALE)
    return model


def _tokens(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, S), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _decision_gap(model: TransformerLM, tokens_BS: torch.Tensor, threshold: float) -> float:
    """How far the causal pass at ``threshold`` stays from each of its decisions: every exit's
    confidence from the threshold and every MoD predictor logit from its boundary."""
    with recorded(model) as decisions:
        out = model(tokens_BS, routing="causal", threshold=threshold)
    gaps = [threshold_gap(confidence(x), threshold) for x in out.exit_logits.values()]
    return min_gap([*gaps, decisions.min_gap()])


def _decode(model: TransformerLM, tokens_BS: torch.Tensor, prompt: int, threshold: float):
    logits_BPV, state = model.prefill(tokens_BS[:, :prompt], threshold=threshold)
    steps = [logits_BPV]
    for t in range(prompt, tokens_BS.shape[1]):
        steps.append(model.decode_step(tokens_BS[:, t : t + 1], state).unsqueeze(1))
    return torch.cat(steps, dim=1), state


@torch.no_grad()
def test_exit_logits_are_the_shared_head_on_the_prefix_of_the_stack() -> None:
    model = _model(["dense", "moe"])
    tokens_BS = _tokens(2)
    out = model(tokens_BS)
    pos_BS = torch.arange(S).expand(2, S)
    x_BSD = model.embed(tokens_BS)
    for d in (1, 2):
        x_BSD, _ = model.layers[d - 1](x_BSD, pos_BS)
        torch.testing.assert_close(out.exit_logits[d], model.head(model.norm(x_BSD)))
    # A threshold that never exits: the causal (decode-rule) pass is the static one.
    causal = model(tokens_BS, routing="causal", threshold=1.0)
    torch.testing.assert_close(causal.logits, out.logits, atol=0, rtol=0)
    assert causal.depth is not None and causal.depth.histogram() == {1: 0, 2: 0, 4: 2 * S}


def test_training_loss_adds_the_weighted_exit_losses() -> None:
    model = _model(["dense"], [1, 3], loss_weights=[0.5, 2.0], loss_coef=0.3)
    tokens_BS, targets_BS = _tokens(2), _tokens(2, seed=2)
    out = model(tokens_BS, targets_BS)

    def ce(logits_BSV: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_BSV.reshape(-1, V), targets_BS.reshape(-1))

    exit_loss = 0.5 * ce(out.exit_logits[1]) + 2.0 * ce(out.exit_logits[3])
    torch.testing.assert_close(out.ce, ce(out.logits).detach())
    torch.testing.assert_close(out.loss, ce(out.logits) + 0.3 * exit_loss)
    torch.testing.assert_close(out.terms[Term.EXIT_LOSS], exit_loss.detach())
    assert Term.EXIT_CE in out.stats[0] and Term.EXIT_CE in out.stats[2]
    out.loss.backward()
    assert model.layers[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("pattern", [["dense"], ["dense", "mod"], ["moe"]])
@pytest.mark.parametrize("batch", [1, 3])
def test_never_exiting_decode_equals_full_depth(pattern: list[str], batch: int) -> None:
    model = _model(pattern)
    tokens_BS = _tokens(batch)
    with torch.no_grad():
        full_BSV = model(tokens_BS, routing="causal", threshold=1.0).logits
    assert_clear(_decision_gap(model, tokens_BS, 1.0), "MoD predictor logits")
    dec_BSV, state = _decode(model, tokens_BS, 4, threshold=1.0)
    torch.testing.assert_close(dec_BSV, full_BSV, atol=TOL, rtol=0)
    assert state.depth == {4: batch * S} and state.mean_depth() == 4.0
    if pattern == ["dense"]:  # and the static training forward, too
        torch.testing.assert_close(dec_BSV, model(tokens_BS).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("pattern", [["dense"], ["dense", "mod"]])
@pytest.mark.parametrize("batch", [1, 3])
def test_exiting_decode_equals_the_causal_forward(pattern: list[str], batch: int) -> None:
    model = _model(pattern)
    tokens_BS = _tokens(batch)
    with torch.no_grad():
        first = confidence(model(tokens_BS).exit_logits[1])
    # About half the tokens exit at the first exit: mixed steps, propagated K/V. The decode
    # path computes every decision from its own (rounding-equal, not bitwise-equal) states,
    # so the threshold keeps a margin from every score the causal pass decides on.
    threshold = clear_threshold(first, check=lambda thr: _decision_gap(model, tokens_BS, thr))
    with torch.no_grad():
        causal = model(tokens_BS, routing="causal", threshold=threshold)
    dec_BSV, state = _decode(model, tokens_BS, 3, threshold)
    torch.testing.assert_close(dec_BSV, causal.logits, atol=TOL, rtol=0)
    assert causal.depth is not None
    hist = causal.depth.histogram()
    assert state.depth == {k: v for k, v in hist.items() if v}
    assert hist[1] > 0 and hist[4] > 0
    # Every block caches every token (state propagation), exited or not.
    for layer, lengths in zip(state.layers, state.cache_lengths(), strict=True):
        if not layer.routed:
            assert lengths == [S] * batch
    if batch == 1:  # one sequence: an exited token only projects K/V in the later blocks
        assert sum(layer.propagated for layer in state.layers) > 0


def test_an_exit_token_gets_its_exit_logits() -> None:
    model = _model(["dense"], [2])
    tokens_BS = _tokens(2)
    with torch.no_grad():
        static = model(tokens_BS)
        causal = model(tokens_BS, routing="causal", threshold=0.0)
    # Threshold 0 exits every token at the first exit; the first token sees no other
    # token, so its logits are the static exit's exactly.
    torch.testing.assert_close(causal.logits[:, 0], static.exit_logits[2][:, 0])
    assert causal.depth is not None and causal.depth.histogram() == {2: 2 * S, 4: 0}


def test_layer_dropout_only_in_training() -> None:
    model = _model(["dense"], [2], layer_dropout=0.9)
    tokens_BS = _tokens(4)
    with torch.no_grad():
        ref = model(tokens_BS).logits
        model.train()
        torch.manual_seed(3)
        dropped = model(tokens_BS).logits
    assert dropped.shape == ref.shape and not torch.allclose(dropped, ref)
    no_drop = _model(["dense"], [2])
    with torch.no_grad():
        torch.testing.assert_close(no_drop.train()(tokens_BS).logits, ref)


@pytest.mark.parametrize(
    "change,key",
    [
        ({"exit": ExitConfig(layers=[4])}, "model.exit.layers"),
        ({"exit": ExitConfig(layers=[2, 1])}, "model.exit.layers"),
        ({"exit": ExitConfig(layers=[1], loss_weights=[1, 2])}, "model.exit.loss_weights"),
        ({"exit": ExitConfig(layers=[1], threshold=1.5)}, "model.exit.threshold"),
        ({"exit": ExitConfig(layer_dropout=1.0)}, "model.exit.layer_dropout"),
        ({"layer_pattern": ["dense", "ponder"]}, "model.layer_pattern"),
        (
            {"layer_pattern": ["dense", "dense", "dense", "ponder"], "exit": ExitConfig([1])},
            "model.exit.layers",
        ),
    ],
)
def test_bad_exit_keys_name_the_key(change: dict, key: str) -> None:
    cfg = dataclasses.replace(_cfg(["dense"], []), **change)
    with pytest.raises(ConfigError) as err:
        validate_model(cfg)
    assert str(err.value).startswith(key + ":") and "\n" not in str(err.value)
