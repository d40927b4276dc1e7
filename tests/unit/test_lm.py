"""TransformerLM: every block kind trains, the loss is ce + weighted aux, stats, generate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.decisions import recorded
from tests.margins import assert_clear, topk_gap
from turnout.config.model import MoDConfig, ModelConfig, MoEConfig, validate_model
from turnout.models.lm import TransformerLM
from turnout.models.mod import MoDBlock
from turnout.models.moe import MoELayer, moe_layers
from turnout.models.terms import Term

pytestmark = pytest.mark.unit


B, S, V = 2, 16, 64


def _cfg(pattern: list[str], max_seq_len: int = 32, **moe: object) -> ModelConfig:
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=len(pattern),
        n_heads=4,
        ffn_dim=48,
        max_seq_len=max_seq_len,
        layer_pattern=pattern,
        moe=MoEConfig(num_experts=4, top_k=2, min_capacity=1, **moe),  # type: ignore[arg-type]
        mod=MoDConfig(capacity=0.25),
    )
    validate_model(cfg)
    return cfg


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens_BS = torch.randint(0, V, (B, S + 1), generator=g)
    return tokens_BS[:, :-1], tokens_BS[:, 1:]


MOE_STATS = {Term.MOE_LB, Term.MOE_Z, Term.MOE_COUNTS, Term.MOE_DROP}
MOD_STATS = {Term.MOD_PRED_LOSS, Term.MOD_CAPACITY, Term.MOD_PRED_ACC}
EXPECTED_STATS = {
    "dense": set(),
    "moe": MOE_STATS,
    "mod": MOD_STATS,
    "mode": MOE_STATS | MOD_STATS,
    "imode": MOE_STATS | {Term.MOE_NOOP},
}


@pytest.mark.parametrize("kind", ["dense", "moe", "mod", "mode", "imode"])
def test_forward_backward_every_block_kind(kind: str) -> None:
    torch.manual_seed(0)
    cfg = _cfg(["dense", kind], num_noop_experts=2 if kind == "imode" else 0)
    lm = TransformerLM(cfg)
    tokens, targets = _batch()
    out = lm(tokens, targets)
    assert out.logits.shape == (B, S, V)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in lm.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert len(out.stats) == 2
    assert set(out.stats[1]) == EXPECTED_STATS[kind]
    assert all(isinstance(k, Term) for k in out.stats[1])
    assert out.stats[0] == {}  # the dense layer has none
    if kind in ("moe", "mode", "imode"):
        counts = out.stats[1][Term.MOE_COUNTS]
        assert counts.dtype == torch.long and counts.shape == (4,)
        n_tokens = S * B if kind != "mode" else B * 4  # mode: ceil(0.25 * 16) = 4 per row
        assert (
            int(counts.sum())
            + (round(out.stats[1][Term.MOE_NOOP].item() * n_tokens * 2) if kind == "imode" else 0)
            == n_tokens * 2
        )
    if kind in ("mod", "mode"):
        assert out.stats[1][Term.MOD_CAPACITY].item() == pytest.approx(0.25)


def test_imode_noop_experts_are_never_dispatched() -> None:
    torch.manual_seed(0)
    lm = TransformerLM(_cfg(["imode"], num_noop_experts=2))
    moe = moe_layers(lm)[0]
    assert moe.router_DE.shape == (32, 6) and moe.experts.num_experts == 4
    with torch.no_grad():  # make both no-op columns win for every token
        moe.router_DE.zero_()
        moe.router_DE[:, 4:] = 1.0
        lm.embed.weight.abs_()
    tokens, targets = _batch()
    block = lm.layers[0]
    captured: dict[str, torch.Tensor] = {}

    def keep_output(module: torch.nn.Module, args: object, output: tuple) -> None:
        captured["y"] = output[0]

    handle = block.ffn.register_forward_hook(keep_output)
    out = lm(tokens, targets)
    handle.remove()
    assert out.stats[0][Term.MOE_NOOP].item() == 1.0
    assert int(out.stats[0][Term.MOE_COUNTS].sum()) == 0
    assert torch.equal(captured["y"], torch.zeros_like(captured["y"]))
    out.loss.backward()
    for p in moe.experts.parameters():
        assert p.grad is None or p.grad.abs().sum() == 0


def test_loss_is_ce_plus_weighted_aux() -> None:
    torch.manual_seed(0)
    cfg = _cfg(["moe", "mode", "mod"])
    cfg.moe.aux_loss_coef, cfg.moe.z_loss_coef, cfg.mod.predictor_loss_coef = 0.3, 0.05, 0.7
    lm = TransformerLM(cfg)
    tokens, targets = _batch()
    out = lm(tokens, targets)
    ce = F.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1))
    # rel 1e-6 for the same reductions over the same values (a few ulps of summation
    # order); 1e-5 where fp32 terms are weighted and summed in another order than here.
    assert out.ce.item() == pytest.approx(ce.item(), rel=1e-6)
    lb = out.stats[0][Term.MOE_LB] + out.stats[1][Term.MOE_LB]
    z = out.stats[0][Term.MOE_Z] + out.stats[1][Term.MOE_Z]
    pred = out.stats[1][Term.MOD_PRED_LOSS] + out.stats[2][Term.MOD_PRED_LOSS]
    assert out.terms[Term.MOE_LB].item() == pytest.approx(lb.item(), rel=1e-6)
    assert out.terms[Term.MOE_Z].item() == pytest.approx(z.item(), rel=1e-6)
    assert out.terms[Term.MOD_PRED_LOSS].item() == pytest.approx(pred.item(), rel=1e-6)
    assert set(out.terms) == {Term.MOE_LB, Term.MOE_Z, Term.MOD_PRED_LOSS}  # the losses only
    aux = 0.3 * lb + 0.05 * z + 0.7 * pred  # (the rel 1e-5 case above)
    assert out.aux_loss.item() == pytest.approx(aux.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(ce.item() + aux.item(), rel=1e-5)
    assert out.aux_loss.requires_grad and not out.ce.requires_grad
    assert all(not v.requires_grad for aux in out.stats for v in aux.values())
    # Without targets: logits only.
    bare = lm(tokens)
    assert bare.loss is None and bare.ce is None
    torch.testing.assert_close(bare.logits, out.logits)


def test_causal_routing_with_no_token_chosen_gives_finite_loss() -> None:
    # Causal (sampling) mode where the predictor skips every token: the MoE inside the
    # MoD block sees zero tokens; its aux losses must be 0, not NaN.
    torch.manual_seed(0)
    lm = TransformerLM(_cfg(["dense", "mode"]))
    mod = lm.layers[1]
    assert isinstance(mod, MoDBlock)
    with torch.no_grad():
        mod.predictor[-1].weight.zero_()  # type: ignore[index]
        mod.predictor[-1].bias.fill_(-5.0)  # type: ignore[index]
    tokens, targets = _batch()
    out = lm(tokens, targets, routing="causal")
    assert out.stats[1][Term.MOD_CAPACITY].item() == 0.0
    assert torch.isfinite(out.loss), out.stats
    assert out.stats[1][Term.MOE_LB].item() == 0.0


def test_generate_runs_and_argmax_is_deterministic() -> None:
    torch.manual_seed(0)
    # Dropless: decoding routes dropless whatever the capacity factor (models/decode.py), so
    # only then is it the causal forward (with capacity 1.25 that forward dropped a quarter
    # of the assignments here; the argmax agreed only because the model was near-uniform).
    # init_std 0.1: predictor and router scores of order 0.1-1, clear of DECISION_MARGIN.
    cfg = _cfg(["dense", "mode", "imode"], 16, capacity_factor=None, num_noop_experts=1)
    cfg.init_std = 0.1
    lm = TransformerLM(cfg).eval()
    prompt = _batch()[0][:, :5]
    a = lm.generate(prompt, 6, temperature=0.0)
    b = lm.generate(prompt, 6, temperature=0.0)
    assert a.shape == (B, 11)
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    # argmax continuation = the argmax of a causal forward over the generated prefix; its
    # argmax and routing decisions are clear of ties (decode computes them in other shapes)
    for t in range(5, 11):
        with torch.no_grad(), recorded(lm) as decisions:
            logits = lm(a[:, :t], routing="causal").logits[:, -1]
        decisions.assert_clear(f"the causal forward over {t} positions")
        assert_clear(topk_gap(logits, 1), f"greedy argmax at position {t}")
        assert torch.equal(a[:, t], logits.argmax(-1))
    # sampling with a seeded generator is reproducible too, up to max_seq_len = 16
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = lm.generate(prompt, 11, temperature=1.0, generator=g1)
    s2 = lm.generate(prompt, 11, temperature=1.0, generator=g2)
    assert s1.shape == (B, 16) and torch.equal(s1, s2)
    assert int(s1.max()) < V and int(s1.min()) >= 0
    # beyond max_seq_len the cached decode refuses (no sliding window), naming the key
    with pytest.raises(ValueError, match="max_seq_len=16"):
        lm.generate(prompt, 12, temperature=1.0)  # 17 > max_seq_len = 16


def test_tied_embeddings() -> None:
    torch.manual_seed(0)
    lm = TransformerLM(_cfg(["dense"]))
    assert lm.head.weight is lm.embed.weight
    names = [n for n, _ in lm.named_parameters()]
    assert "head.weight" not in names and "embed.weight" in names
    tokens, targets = _batch()
    lm(tokens, targets).loss.backward()
    assert lm.embed.weight.grad is not None
    cfg = _cfg(["dense"])
    cfg.tie_embeddings = False
    untied = TransformerLM(cfg)
    assert untied.head.weight is not untied.embed.weight
    n_tied = sum(p.numel() for p in lm.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == V * 32


def test_moe_layers_lists_every_moe() -> None:
    lm = TransformerLM(_cfg(["dense", "moe", "mode", "imode", "mod"], num_noop_experts=1))
    layers = moe_layers(lm)
    assert len(layers) == 3 and all(isinstance(m, MoELayer) for m in layers)
    assert [m.num_noop for m in layers] == [0, 0, 1]
    assert lm.kinds == ["dense", "moe", "mode", "imode", "mod"]


def test_mode_with_router_on_block_input_trains_every_parameter() -> None:
    torch.manual_seed(0)
    cfg = _cfg(["dense", "mode"], router_input="block")
    lm = TransformerLM(cfg)
    mode = lm.layers[1]
    assert isinstance(mode, MoDBlock) and mode.routes_from_block_input
    tokens, targets = _batch()
    out = lm(tokens, targets)
    out.loss.backward()
    for name, p in lm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(out.stats[1]) == EXPECTED_STATS["mode"]
    assert int(out.stats[1][Term.MOE_COUNTS].sum()) == B * 4 * 2  # 4 chosen per row, top-2
    causal = lm(tokens, targets, routing="causal")
    assert causal.loss is not None and torch.isfinite(causal.loss)
