"""Ponder blocks (models/ponder.py): halting distribution, PonderNet loss, causal decode.

Shape legend: N ponder steps, B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.decisions import recorded
from tests.margins import assert_clear, threshold_gap
from turnout.config.model import ModelConfig, PonderConfig, validate_model
from turnout.errors import ConfigError
from turnout.models.lm import TransformerLM
from turnout.models.ponder import PonderBlock, geometric_kl, geometric_prior
from turnout.models.terms import Term

pytestmark = pytest.mark.unit

V, S, N = 64, 12, 3
# Decode and the causal forward run other GEMM shapes (one row per step vs the whole
# sequence): logits of magnitude ~2 agree to ~1e-6; 1e-5 leaves 10x.
TOL = 1e-5
# init_std 0.1 (not the default 0.02) puts the MoD predictor logits at order 0.1 (at 0.02
# they are ~1e-4, all within DECISION_MARGIN of their sign); with model seed 1 every
# halting and predictor decision of these tests is at least 1e-2 from its threshold.
INIT_STD, SEED = 0.1, 1


def _model(pattern: list[str] = ["dense", "ponder"], seed: int = SEED) -> TransformerLM:  # noqa: B006
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=len(pattern),
        n_heads=4,
        ffn_dim=48,
        max_seq_len=16,
        layer_pattern=pattern,
        ponder=PonderConfig(max_steps=N, prior=0.3, kl_coef=0.05),
        init_std=INIT_STD,
    )
    validate_model(cfg)
    torch.manual_seed(seed)
    model = TransformerLM(cfg).eval()
    with torch.no_grad():  # spread the halting probabilities over tokens
        for layer in model.layers:
            if isinstance(layer, PonderBlock):
                layer.halt.weight.normal_(0, 1.0)
    return model


def _tokens(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, S), generator=torch.Generator().manual_seed(seed))


def _ponder(model: TransformerLM) -> tuple[int, PonderBlock]:
    return next((i, m) for i, m in enumerate(model.layers) if isinstance(m, PonderBlock))


def test_halting_distribution_sums_to_one_and_the_loss_is_ponder_net() -> None:
    model = _model()
    tokens_BS, targets_BS = _tokens(2), _tokens(2, seed=2)
    out = model(tokens_BS, targets_BS)
    p_NBS = out.halting
    assert p_NBS is not None and p_NBS.shape == (N, 2, S)
    torch.testing.assert_close(p_NBS.sum(0), torch.ones(2, S))
    assert (p_NBS >= 0).all() and p_NBS.std(dim=(1, 2)).max() > 0.01
    # Expected cross-entropy under the halting distribution + kl_coef * KL.
    i, ponder = _ponder(model)
    pos_BS = torch.arange(S).expand(2, S)
    x_BSD, _ = model.layers[0](model.embed(tokens_BS), pos_BS)
    expected = torch.zeros(2, S)
    for n in range(N):
        x_BSD, _ = ponder.block(x_BSD, pos_BS)
        logits_BSV = model.head(model.norm(x_BSD))
        ce_BS = F.cross_entropy(logits_BSV.reshape(-1, V), targets_BS.reshape(-1), reduction="none")
        expected = expected + p_NBS[n] * ce_BS.view(2, S)
    torch.testing.assert_close(out.logits, logits_BSV)  # the logits are step N's
    kl = geometric_kl(p_NBS, 0.3)
    torch.testing.assert_close(out.ce, expected.mean().detach())
    torch.testing.assert_close(out.loss, expected.mean() + 0.05 * kl)
    assert float(out.terms[Term.PONDER_KL]) == pytest.approx(float(kl.detach()))
    steps = float((p_NBS * torch.arange(1, N + 1).view(-1, 1, 1)).sum(0).mean())
    assert float(out.stats[i][Term.PONDER_STEPS]) == pytest.approx(steps)
    out.loss.backward()
    assert ponder.halt.weight.grad is not None and ponder.halt.weight.grad.abs().sum() > 0


def test_kl_is_zero_at_the_prior() -> None:
    g_N = geometric_prior(4, 0.3)
    assert float(g_N.sum()) == pytest.approx(1.0)
    assert float(g_N[0]) == pytest.approx(0.3) and float(g_N[-1]) == pytest.approx(0.7**3)
    p_NBS = g_N.view(4, 1, 1).expand(4, 2, 5)
    # sum_n g_n log(g_n / g_n) in fp32: each term's log rounds by ~1e-7.
    assert float(geometric_kl(p_NBS, 0.3)) == pytest.approx(0.0, abs=1e-6)
    other = torch.tensor([0.7, 0.1, 0.1, 0.1]).view(4, 1, 1)
    assert float(geometric_kl(other, 0.3)) > 0.1


@pytest.mark.parametrize("pattern", [["dense", "ponder"], ["ponder", "mod", "dense"]])
def test_never_halting_causal_pass_equals_the_static_full_depth(pattern: list[str]) -> None:
    model = _model(pattern)
    tokens_BS = _tokens(2)
    with torch.no_grad():
        static = model(tokens_BS, routing="causal" if "mod" in pattern else "topk")
        causal = model(tokens_BS, routing="causal", threshold=1.0)
    if "mod" not in pattern:
        # Bitwise today, although the causal pass attends with an explicit boolean mask and
        # the static one with is_causal=True: another SDPA backend for one of them would
        # make this exact comparison fail without a bug.
        torch.testing.assert_close(causal.logits, static.logits, atol=0, rtol=0)
    assert causal.depth is not None
    L = len(pattern)
    assert causal.depth.histogram()[L - 1 + N] == 2 * S


@pytest.mark.parametrize("pattern", [["dense", "ponder"], ["ponder", "mod", "dense"]])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_never_halting_equals_full_depth(pattern: list[str], batch: int) -> None:
    model = _model(pattern)
    tokens_BS = _tokens(batch)
    with torch.no_grad(), recorded(model) as decisions:
        full = model(tokens_BS, routing="causal", threshold=1.0).logits
    # Threshold 1.0 never halts (1 - survive <= 1); the MoD predictor's sign is the decision
    # decode could take otherwise.
    decisions.assert_clear("the causal forward")
    logits_BPV, state = model.prefill(tokens_BS[:, :4], threshold=1.0)
    steps = [logits_BPV]
    for t in range(4, S):
        steps.append(model.decode_step(tokens_BS[:, t : t + 1], state).unsqueeze(1))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=TOL, rtol=0)
    if pattern == ["dense", "ponder"]:
        torch.testing.assert_close(torch.cat(steps, 1), model(tokens_BS).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prompt", [1, 5])
def test_halting_decode_equals_the_causal_forward_and_skips(batch: int, prompt: int) -> None:
    model = _model()
    tokens_BS = _tokens(batch)
    threshold = 0.5
    with torch.no_grad():
        causal = model(tokens_BS, routing="causal", threshold=threshold)
    assert causal.halting is not None
    # A token halts where its cumulative halting probability (the cumsum of p_n) first
    # passes the threshold: decode computes it from other GEMM shapes, so it must be clear.
    cumulative_NBS = causal.halting.cumsum(0)[:-1]
    assert_clear(threshold_gap(cumulative_NBS, threshold), "cumulative halting vs threshold")
    logits_BPV, state = model.prefill(tokens_BS[:, :prompt], threshold=threshold)
    steps = [logits_BPV]
    for t in range(prompt, S):
        steps.append(model.decode_step(tokens_BS[:, t : t + 1], state).unsqueeze(1))
    torch.testing.assert_close(torch.cat(steps, 1), causal.logits, atol=TOL, rtol=0)
    assert causal.depth is not None
    used_BS = causal.depth.blocks_BS - 1  # applications of the ponder block
    assert used_BS.min() >= 1 and used_BS.min() < used_BS.max()  # some halt early
    # Application n's cache holds exactly the tokens that reached it.
    i, _ = _ponder(model)
    layer = state.layers[i]
    for n, cache in enumerate([layer.cache, *layer.more]):
        assert cache.lengths == (used_BS > n).sum(1).tolist()
    assert layer.skipped == int((N - used_BS).sum())
    assert state.depth == {k: v for k, v in causal.depth.histogram().items() if v}
    assert state.mean_depth() == pytest.approx(float(causal.depth.blocks_BS.float().mean()))


def test_threshold_zero_halts_after_one_step() -> None:
    model = _model()
    with torch.no_grad():
        out = model(_tokens(2), routing="causal", threshold=0.0)
    assert out.depth is not None and out.depth.histogram()[2] == 2 * S


@pytest.mark.parametrize(
    "key,value",
    [("max_steps", 0), ("prior", 0.0), ("prior", 1.5), ("kl_coef", -1.0), ("threshold", 2.0)],
)
def test_bad_ponder_keys_name_the_key(key: str, value: float) -> None:
    cfg = ModelConfig(layer_pattern=["dense", "ponder"], n_layers=2)
    setattr(cfg.ponder, key, value)
    with pytest.raises(ConfigError) as err:
        validate_model(cfg)
    assert str(err.value).startswith(f"model.ponder.{key}:")
    assert "\n" not in str(err.value)
