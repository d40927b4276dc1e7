"""Mixture-of-Recursions (models/recursion.py): routing, the two KV policies, decode.

Shape legend: R recursions, B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.decisions import recorded
from tests.margins import assert_clear, topk_gap
from turnout.config import TurnoutConfig
from turnout.config.model import ModelConfig, RecursionConfig, validate_model
from turnout.errors import ConfigError
from turnout.models.decode import DecodeState
from turnout.models.lm import TransformerLM
from turnout.models.recursion import RecursionBlock
from turnout.models.routing import mod_capacity, mod_select
from turnout.models.terms import Term
from turnout.trainer.weights.export import write_turnout
from turnout.trainer.weights.hf_format import write_hf

pytestmark = pytest.mark.unit

V, S, R = 64, 12, 3
# Decode and the full-sequence forms run other GEMM shapes (one row per step, compacted
# rows vs the whole sequence): logits of magnitude ~2 agree to ~1e-6; 1e-5 leaves 10x.
TOL = 1e-5
# init_std 0.1 puts the predictor and router logits at order 0.1-1, so the decisions of
# these tests have room from their boundaries (checked by each test, not assumed).
INIT_STD = 0.1
PATTERN = ["dense", "recursion", "dense"]


def _model(seed: int = 0, pattern: list[str] = PATTERN, **rc: object) -> TransformerLM:
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=len(pattern),
        n_heads=4,
        ffn_dim=48,
        max_seq_len=16,
        layer_pattern=pattern,
        init_std=INIT_STD,
        recursion=RecursionConfig(**{"max_recursions": R, "predictor_hidden": 16, **rc}),
    )
    validate_model(cfg)
    torch.manual_seed(seed)
    return TransformerLM(cfg).eval()


def _tokens(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, S), generator=torch.Generator().manual_seed(seed))


def _recursion(model: TransformerLM) -> tuple[int, RecursionBlock]:
    return next((i, m) for i, m in enumerate(model.layers) if isinstance(m, RecursionBlock))


def _decode(
    model: TransformerLM, tokens_BS: torch.Tensor, prompt: int
) -> tuple[torch.Tensor, DecodeState]:
    logits_BPV, state = model.prefill(tokens_BS[:, :prompt])
    steps = [logits_BPV]
    for t in range(prompt, S):
        steps.append(model.decode_step(tokens_BS[:, t : t + 1], state).unsqueeze(1))
    return torch.cat(steps, 1), state


@pytest.mark.parametrize("routing", ["expert", "token"])
@pytest.mark.parametrize("cache", ["per_recursion", "shared_first"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_equals_the_causal_forward_and_skips_for_real(
    routing: str, cache: str, group: int, batch: int
) -> None:
    model = _model(routing=routing, cache=cache, group=group)
    i, _ = _recursion(model)
    tokens_BS = _tokens(batch)
    with torch.no_grad(), recorded(model) as decisions:
        causal = model(tokens_BS, routing="causal")
    assert decisions.only("recursion").gaps  # the hook saw the recursions' decisions
    decisions.assert_clear("a recursion decision of the causal forward")
    logits_BSV, state = _decode(model, tokens_BS, prompt=5)
    torch.testing.assert_close(logits_BSV, causal.logits, atol=TOL, rtol=0)
    assert causal.depth is not None
    ran_BS = (causal.depth.blocks_BS - (len(PATTERN) - 1)) // group  # recursions per token
    assert ran_BS.min() >= 1 and ran_BS.min() < ran_BS.max()  # depths differ
    layer = state.layers[i]
    caches = layer.caches
    # Cache sizes are the processed counts: recursion r's holds the tokens that ran it; a
    # shared cache holds recursion 1's only.
    for r in range(1 if cache == "shared_first" else R):
        for j in range(group):
            assert caches[r * group + j].lengths == (ran_BS > r).sum(1).tolist()
    assert len(caches) == group * (1 if cache == "shared_first" else R)
    assert layer.processed == int(ran_BS.sum())
    assert layer.skipped == int((R - ran_BS).sum())
    assert state.depth == {k: v for k, v in causal.depth.histogram().items() if v}


@pytest.mark.parametrize("cache", ["per_recursion", "shared_first"])
@pytest.mark.parametrize("group", [1, 2])
def test_static_topk_equals_the_masked_dense_form_of_the_same_choice(
    cache: str, group: int
) -> None:
    """The compacted training form (k_r rows per sequence) is the masked-dense definition
    for the top-k choice: the same output, chosen tokens and depths."""
    model = _model(cache=cache, group=group)
    _, block = _recursion(model)
    B = 3
    x_BSD = torch.randn(B, S, 32, generator=torch.Generator().manual_seed(3))
    pos_BS = torch.arange(S).expand(B, S)
    with torch.no_grad():
        out_BSD, ran_BS, aux = block(x_BSD, pos_BS)
        h_BSD = x_BSD
        eligible_BS = torch.ones(B, S, dtype=torch.bool)
        first: list = []
        first_BS = None
        for r in range(R):
            score_BS = block.scores(h_BSD, r)
            masked_BS = score_BS.masked_fill(~eligible_BS, torch.finfo(torch.float32).min)
            k = mod_capacity(S, block.capacities[r])
            assert_clear(topk_gap(masked_BS, k), f"recursion {r}'s top-{k} cut")
            _, chosen_BS = mod_select(masked_BS, k)
            h_BSD = block._masked(
                h_BSD, pos_BS, chosen_BS, block.gate(score_BS), r, first, first_BS
            )
            first_BS = chosen_BS if first_BS is None else first_BS
            eligible_BS = chosen_BS
            assert (ran_BS > r).sum(1).tolist() == [k] * B
    torch.testing.assert_close(out_BSD, h_BSD, atol=TOL, rtol=0)
    assert float(aux[Term.REC_DEPTH]) == pytest.approx(float(ran_BS.float().mean()))


def test_training_loss_weights_the_predictor_bce_and_gradients_reach_the_routers() -> None:
    model = _model(predictor_loss_coef=0.3).train()
    i, block = _recursion(model)
    tokens_BS, targets_BS = _tokens(2), _tokens(2, seed=2)
    out = model(tokens_BS, targets_BS)
    bce = out.terms[Term.REC_PRED_LOSS]
    assert out.ce is not None and out.loss is not None
    torch.testing.assert_close(out.loss.detach(), out.ce + 0.3 * bce)
    assert 0.0 <= float(out.stats[i][Term.REC_PRED_ACC]) <= 1.0
    assert sorted(block.predictors) == ["1", "2"]  # capacity 1 at recursion 1: no decision
    out.loss.backward()
    assert block.router.weight.grad is not None
    # Every recursion's gate reaches its router column (top-k choices scale by g(score)).
    assert (block.router.weight.grad.abs().sum(1) > 0).all()
    for p in block.predictors.values():
        assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in p.parameters())


def test_token_routing_trains_with_a_balance_loss_and_is_causal_by_construction() -> None:
    model = _model(routing="token", balance_coef=0.2).train()
    i, block = _recursion(model)
    tokens_BS, targets_BS = _tokens(2), _tokens(2, seed=2)
    out = model(tokens_BS, targets_BS)
    assert out.ce is not None and out.loss is not None
    balance = out.terms[Term.REC_BALANCE]
    torch.testing.assert_close(out.loss.detach(), out.ce + 0.2 * balance)
    assert not block.predictors
    out.loss.backward()
    assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0
    # The depth is the entry router's argmax: top-k and causal routing are one computation.
    with torch.no_grad():
        static = model.eval()(tokens_BS)
        causal = model(tokens_BS, routing="causal")
    torch.testing.assert_close(causal.logits, static.logits, atol=0, rtol=0)
    assert static.depth is not None and causal.depth is not None
    assert torch.equal(static.depth.blocks_BS, causal.depth.blocks_BS)


def test_capacity_one_runs_every_token_every_recursion_without_a_decision() -> None:
    model = _model(capacities=[1.0, 1.0, 1.0])
    _, block = _recursion(model)
    assert block.decided() == [] and not block.predictors
    with torch.no_grad():
        static = model(_tokens(2))
        causal = model(_tokens(2), routing="causal")
    torch.testing.assert_close(causal.logits, static.logits, atol=TOL, rtol=0)
    assert static.depth is not None
    assert static.depth.histogram() == {2 + r: 0 for r in range(1, R)} | {2 + R: 2 * S}


@pytest.mark.parametrize("routing", ["expert", "token"])
def test_activation_checkpointing_replays_the_routing(routing: str) -> None:
    tokens_BS, targets_BS = _tokens(2), _tokens(2, seed=2)
    grads = []
    for mode in ("none", "full"):
        model = _model(routing=routing).train()
        model.set_activation_checkpointing(mode)
        out = model(tokens_BS, targets_BS)
        assert out.loss is not None
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        # The recompute runs the same ops on the same inputs with the recorded decisions:
        # bit-equal on one CPU, no tolerance needed.
        torch.testing.assert_close(grads[1][name], g, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize(
    "key,value",
    [
        ("max_recursions", 0),
        ("group", 0),
        ("routing", "depth"),
        ("cache", "all"),
        ("predictor", "oracle"),
        ("router_gate", "tanh"),
        ("predictor_hidden", 0),
        ("predictor_loss_coef", -1.0),
        ("balance_coef", float("nan")),
        ("capacities", [1.0, 0.5]),
        ("capacities", [0.5, 1.0, 0.25]),
        ("capacities", [1.0, 0.5, 0.0]),
    ],
)
def test_bad_recursion_keys_name_the_key(key: str, value: object) -> None:
    cfg = ModelConfig(layer_pattern=PATTERN, n_layers=3)
    setattr(cfg.recursion, key, value)
    with pytest.raises(ConfigError) as err:
        validate_model(cfg)
    assert str(err.value).startswith(f"model.recursion.{key}:")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "pattern,extra,key",
    [
        (["recursion", "dense", "recursion"], {}, "model.layer_pattern"),
        (["dense", "recursion", "ponder"], {}, "model.layer_pattern"),
        (["dense", "recursion", "dense"], {"exit_layers": [1]}, "model.exit.layers"),
    ],
)
def test_recursion_refuses_what_it_does_not_combine_with(
    pattern: list[str], extra: dict, key: str
) -> None:
    cfg = ModelConfig(layer_pattern=pattern, n_layers=3)
    if "exit_layers" in extra:
        cfg.exit.layers = extra["exit_layers"]
    with pytest.raises(ConfigError) as err:
        validate_model(cfg)
    assert str(err.value).startswith(f"{key}:")


def test_a_recursion_model_exports_in_turnout_format_and_loads_back(tmp_path: Path) -> None:
    model = _model(cache="shared_first", group=2)
    cfg = TurnoutConfig(model=model.cfg)
    write_turnout(tmp_path / "out", model.state_dict(), cfg, step=7)
    loaded = TransformerLM.from_pretrained(tmp_path / "out")
    tokens_BS = _tokens(2)
    with torch.no_grad():
        # The same weights in the same module order: the same computation, bit for bit.
        torch.testing.assert_close(
            loaded(tokens_BS).logits, model(tokens_BS).logits, atol=0, rtol=0
        )
    with pytest.raises(ConfigError) as err:
        write_hf(tmp_path / "hf", cfg, model.state_dict())
    assert err.value.key == "model.layer_pattern" and "recursion" in str(err.value)
