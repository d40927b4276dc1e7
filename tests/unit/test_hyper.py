"""Hyper-experts (models/hyper.py, model.moe.hyper): the factored adapter against the
explicitly generated one, the condition by hand, the shared hypernetwork, the zero start,
gradients, counts and the config's one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from turnout.config.hyper import HyperConfig
from turnout.config.model import MoDConfig, ModelConfig, MoEConfig, validate_model
from turnout.errors import ConfigError
from turnout.models.hyper import HyperNet, adapter_reference, condition, hyper_nets
from turnout.models.lm import TransformerLM
from turnout.models.moe import moe_layers
from turnout.models.params import count_params
from turnout.models.terms import Term

pytestmark = pytest.mark.unit

V, S = 48, 12


def _cfg(pattern: list[str], hyper: HyperConfig | None = None, **moe: object) -> ModelConfig:
    moe_cfg: dict = dict(num_experts=4, top_k=2, capacity_factor=None, min_capacity=1)
    moe_cfg.update(moe)
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=len(pattern),
        n_heads=4,
        ffn_dim=48,
        max_seq_len=S,
        init_std=0.1,
        layer_pattern=pattern,
        moe=MoEConfig(hyper=hyper or HyperConfig(enabled=True), **moe_cfg),
        mod=MoDConfig(capacity=0.5),
    )
    validate_model(cfg)
    return cfg


def _tokens(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (batch, S), generator=torch.Generator().manual_seed(5))


def _working(net: HyperNet) -> HyperNet:
    """A hypernetwork whose up maps are not the zero of a fresh one."""
    with torch.no_grad():
        net.up_HrD.normal_(std=0.1)
    return net


@pytest.mark.parametrize(("d_model", "rank", "hidden"), [(32, 4, 16), (24, 1, 3), (16, 8, 2)])
def test_factored_adapter_equals_the_generated_matrices(
    d_model: int, rank: int, hidden: int
) -> None:
    torch.manual_seed(0)
    net = _working(HyperNet(d_model, HyperConfig(True, rank, 8, hidden), init_std=0.3))
    x_TD = torch.randn(7, d_model, dtype=torch.float64, requires_grad=True)
    c_TC = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    net = net.double()
    got = net(x_TD, c_TC)
    want = adapter_reference(net, x_TD, c_TC)
    # float64: the two forms sum the same products in another order, ~1e-16 relative;
    # 1e-12 leaves room for the reduction orders of other BLAS builds.
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [x_TD, c_TC, *net.parameters()], g)
    ref = torch.autograd.grad(want, [x_TD, c_TC, *net.parameters()], g)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert float(got.detach().abs().max()) > 1e-3  # not two zeros agreeing


def test_condition_is_the_weighted_mean_of_the_unselected_embeddings() -> None:
    probs_TR = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    expert_TK = torch.tensor([[0, 1], [3, 0]])
    emb_RC = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-4.0, 8.0]])
    got = condition(probs_TR.log(), expert_TK, emb_RC)
    # Token 0 left out experts 2 and 3 (weights 0.2, 0.1); token 1 experts 1 and 2 (0.2, 0.3).
    want = torch.stack(
        [(0.2 * emb_RC[2] + 0.1 * emb_RC[3]) / 0.3, (0.2 * emb_RC[1] + 0.3 * emb_RC[2]) / 0.5]
    )
    # A log, an exp and a softmax in fp32 on values of order 1: a few ulp.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_router_sure_of_its_choice_still_gives_finite_gradients() -> None:
    """The unselected experts' probabilities underflow next to the chosen ones (a logit
    gap of 200): the condition and the router's gradient through it stay finite."""
    logits_TR = torch.tensor([[200.0, 199.0, 0.0, -1.0]], requires_grad=True)
    emb_RC = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    c = condition(logits_TR, torch.tensor([[0, 1]]), emb_RC)
    (10.0 * c).sum().backward()
    assert torch.isfinite(c).all() and torch.isfinite(logits_TR.grad).all()
    w = torch.softmax(torch.tensor([0.0, -1.0]), -1)
    torch.testing.assert_close(c[0], w[0] * emb_RC[2] + w[1] * emb_RC[3])


def test_the_expert_tables_are_not_weight_decayed() -> None:
    from turnout.trainer.engine import optimizer_param_groups

    model = TransformerLM(_cfg(["dense", "moe"]))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in optimizer_param_groups(model, 0.1)}
    table = id(moe_layers(model)[0].hyper_emb_RC)
    assert table in groups["no_decay"] and id(model.hyper.down_DHr) in groups["decay"]


def test_one_hypernetwork_serves_every_moe_layer_and_is_stored_once() -> None:
    model = TransformerLM(_cfg(["moe", "dense", "moe", "mode"]))
    (net,) = hyper_nets(model)
    layers = moe_layers(model)
    assert len(layers) == 3 and all(layer._hyper == [net] for layer in layers)
    keys = [k for k in model.state_dict() if "hyper" in k]
    assert sorted(k for k in keys if k.startswith("hyper.")) == [
        "hyper.down_DHr",
        "hyper.in_CH",
        "hyper.in_bias_H",
        "hyper.up_HrD",
    ]
    assert sum(k.endswith("ffn.hyper_emb_RC") for k in keys) == 3
    tables = [layer.hyper_emb_RC for layer in layers]
    assert not torch.equal(tables[0], tables[1]) and not torch.equal(tables[1], tables[2])
    counted = count_params(model.cfg)
    assert counted.total == sum(p.numel() for p in model.parameters())
    assert counted.hyper == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("pattern", [["dense", "moe"], ["dense", "mode"]])
def test_a_fresh_model_computes_what_the_same_model_without_hyper_experts_does(
    pattern: list[str],
) -> None:
    torch.manual_seed(0)
    plain = TransformerLM(_cfg(pattern, HyperConfig()))
    torch.manual_seed(0)
    hyper = TransformerLM(_cfg(pattern))
    # The hyper-experts draw from streams of their own: every other weight is the same.
    theirs = hyper.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in plain.state_dict().items())
    assert all("hyper" in k for k in set(theirs) - set(plain.state_dict()))
    x = _tokens()
    a, b = plain(x, x), hyper(x, x)
    # The up maps start at zero: the adapter adds exact zeros, so the outputs are equal.
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert float(b.stats[1][Term.MOE_HYPER]) == 0.0
    assert Term.MOE_HYPER not in a.stats[1]


def test_the_adapter_trains_its_weights_the_embeddings_and_the_router() -> None:
    torch.manual_seed(0)
    model = TransformerLM(_cfg(["dense", "moe"]))
    _working(model.hyper)
    x = _tokens()
    out = model(x, x)
    assert float(out.stats[1][Term.MOE_HYPER]) > 0
    # The cross-entropy alone (no aux loss): its router gradient must come partly through
    # the condition; the same model without the adapter's path gives another router grad.
    logits = out.logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
    ce.backward()
    moe = moe_layers(model)[0]
    for p in (*model.hyper.parameters(), moe.hyper_emb_RC):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    with_adapter = moe.router_DE.grad.clone()
    model.zero_grad()
    with torch.no_grad():
        model.hyper.up_HrD.zero_()
    logits = model(x).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    assert not torch.equal(moe.router_DE.grad, with_adapter)


def test_capacity_drops_leave_the_adapter_on_every_token() -> None:
    """A token whose experts were all dropped for capacity still gets its adapter."""
    torch.manual_seed(0)
    cfg = _cfg(["moe"], capacity_factor=0.25)
    model = TransformerLM(cfg).eval()
    _working(model.hyper)
    moe = moe_layers(model)[0]
    x_TD = torch.randn(16, cfg.d_model)
    with torch.no_grad():
        y_TD, aux = moe(x_TD)
        moe.hyper_emb_RC.zero_()  # condition 0: the adapter of a zero condition
        y0_TD, _ = moe(x_TD)
    assert float(aux.dropped) > 0
    assert (y_TD - y0_TD).norm(dim=-1).min() > 0  # every row's output moved


def test_turnout_keys_and_metrics_name_the_hyper_settings() -> None:
    from turnout.launch.keys import config_keys

    docs = {k: doc for k, _, doc in config_keys()}
    for name in ("enabled", "rank", "embed_dim", "hidden"):
        assert docs[f"model.moe.hyper.{name}"]  # listed, with its meaning
    from turnout.models.terms import mlflow_metrics

    assert "layer<i>/hyper_norm" in mlflow_metrics()


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"rank": 0}, "model.moe.hyper.rank", "must be >= 1"),
        ({"embed_dim": -1}, "model.moe.hyper.embed_dim", "must be >= 1"),
        ({"hidden": 0}, "model.moe.hyper.hidden", "must be >= 1"),
    ],
)
def test_bad_sizes_are_one_line_naming_the_key(change: dict, key: str, words: str) -> None:
    cfg = _cfg(["moe"])
    cfg = dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, hyper=HyperConfig(enabled=True, **change))
    )
    with pytest.raises(ConfigError) as err:
        validate_model(cfg)
    assert err.value.key == key and words in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("pattern", "moe", "words"),
    [
        (["dense"], {}, "no MoE block"),
        (["moe"], {"top_k": 4}, "no unselected expert"),
        (["imode"], {"num_noop_experts": 1}, "'imode'"),
    ],
)
def test_models_hyper_experts_cannot_adapt_are_refused(
    pattern: list[str], moe: dict, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(pattern, **moe)
    assert err.value.key == "model.moe.hyper.enabled" and words in str(err.value)


def test_turnout_plan_counts_the_hypernetwork() -> None:
    from turnout.config.load import load_config
    from turnout.trainer.planner.plan import plan

    base = plan(load_config("tiny", []))
    hyper = plan(load_config("tiny", ["model.moe.hyper.enabled=true"]))
    cfg = load_config("tiny", ["model.moe.hyper.enabled=true"]).model
    added = count_params(cfg).total - count_params(load_config("tiny", []).model).total
    assert added == count_params(cfg).hyper + sum(
        cfg.moe.num_experts * cfg.moe.hyper.embed_dim for k in cfg.blocks() if k.has_moe
    )
    assert hyper.params.total - base.params.total == added
    assert hyper.memory.activations > base.memory.activations


def test_the_dense_counterpart_has_no_hypernetwork() -> None:
    from turnout.models.flops import dense_counterpart

    dense = dense_counterpart(_cfg(["dense", "moe"]))
    validate_model(dense)
    assert count_params(dense).hyper == 0 and not dense.moe.hyper.enabled


def test_turnout_export_round_trips_the_hyper_experts(tmp_path: object) -> None:
    from pathlib import Path

    from turnout.config import TurnoutConfig
    from turnout.trainer.weights.export import write_turnout

    cfg = _cfg(["dense", "moe"])
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    _working(model.hyper)
    folder = Path(str(tmp_path)) / "export"
    write_turnout(folder, model.state_dict(), TurnoutConfig(model=cfg), step=1)
    loaded = TransformerLM.from_pretrained(folder).eval()
    assert loaded.cfg.moe.hyper == cfg.moe.hyper
    assert moe_layers(loaded)[0]._hyper == [loaded.hyper]
    x = _tokens()
    with torch.no_grad():
        # The same weights through the same modules and kernels: bit-equal.
        assert torch.equal(loaded(x).logits, model(x).logits)
