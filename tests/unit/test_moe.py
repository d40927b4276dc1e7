"""MoELayer: equivalence with Hugging Face Mixtral, no-op experts, the dispatcher seam."""

from __future__ import annotations

import pytest
import torch

from tests.decisions import recorded
from turnout.config.model import MoEConfig
from turnout.models.dispatch import LocalDispatcher
from turnout.models.experts import ExpertBank
from turnout.models.moe import MoELayer
from turnout.models.routing import RoutingPlan

pytestmark = pytest.mark.unit


def _mixtral_from(layer: MoELayer, d_model: int, hidden: int) -> torch.nn.Module:
    """Build HF's MixtralSparseMoeBlock (no weights downloaded) holding ``layer``'s weights."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    E = layer.num_experts
    cfg = transformers.MixtralConfig(
        hidden_size=d_model,
        intermediate_size=hidden,
        num_local_experts=E,
        num_experts_per_tok=2,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    hf = MixtralSparseMoeBlock(cfg).eval()
    bank = layer.experts
    with torch.no_grad():
        hf.gate.weight.copy_(layer.router_DE.t())  # ours [D, E], theirs [E, D]
        experts = hf.experts
        if hasattr(experts, "gate_up_proj"):  # transformers >= 5: stacked [E, 2F, D], [E, D, F]
            gate_up = torch.cat([bank.w_gate_EDF.transpose(1, 2), bank.w_up_EDF.transpose(1, 2)], 1)
            experts.gate_up_proj.copy_(gate_up)
            experts.down_proj.copy_(bank.w_down_EFD.transpose(1, 2))
        else:  # transformers 4.x: ModuleList of w1 (gate), w3 (up), w2 (down) Linear layers
            for e, ex in enumerate(experts):
                ex.w1.weight.copy_(bank.w_gate_EDF[e].t())
                ex.w3.weight.copy_(bank.w_up_EDF[e].t())
                ex.w2.weight.copy_(bank.w_down_EFD[e].t())
    return hf


def test_dropless_equals_hf_mixtral() -> None:
    torch.manual_seed(0)
    B, S, D, F, E = 2, 9, 16, 24, 4
    layer = MoELayer(D, F, MoEConfig(num_experts=E, top_k=2, capacity_factor=None), init_std=0.2)
    hf = _mixtral_from(layer, D, F)
    x_BSD = torch.randn(B, S, D)
    with torch.no_grad(), recorded(layer) as decisions:
        ours = layer(x_BSD.reshape(B * S, D))[0].view(B, S, D)
    # HF computes the router logits with its own Linear (x @ W^T) and takes torch.topk of
    # the probabilities: the same top-2 only where ours is clear of a tie.
    decisions.assert_clear("our router's top-2")
    with torch.no_grad():
        theirs = hf(x_BSD.clone())
    if isinstance(theirs, tuple):  # transformers 4.x returns (hidden, router_logits)
        theirs = theirs[0]
    assert ours.abs().max() > 1e-3  # a non-trivial output
    # Our grouped GEMM over each expert's rows vs HF's per-expert Linear loop: other
    # blockings of the same dot products, ~1e-7 measured on outputs of ~2.5.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_noop_experts_are_never_dispatched() -> None:
    torch.manual_seed(0)
    D = 8
    cfg = MoEConfig(num_experts=2, top_k=1, capacity_factor=None, num_noop_experts=2)
    layer = MoELayer(D, 12, cfg, init_std=0.2, num_noop=2)
    assert layer.router_DE.shape == (D, 4)
    x_TD = torch.randn(10, D)
    with torch.no_grad():  # tokens 0..4 pick a no-op expert (column 2), 5..9 expert 0
        layer.router_DE.zero_()
        layer.router_DE[0, 2] = 50.0
        layer.router_DE[0, 0] = -50.0
        x_TD[:5, 0] = 1.0
        x_TD[5:, 0] = -1.0
    seen: list[RoutingPlan] = []
    local = LocalDispatcher()

    def recording(x: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
        seen.append(plan)
        return local(x, plan, experts)

    layer.dispatcher = recording
    y_TD, aux = layer(x_TD)
    plan = seen[0]
    assert plan.expert_TK[:5].flatten().tolist() == [2] * 5
    assert not plan.keep_TK[:5].any()  # chosen but not dispatched
    assert plan.keep_TK[5:].all()
    assert torch.equal(y_TD[:5], torch.zeros(5, D))  # no-op adds nothing: residual only
    assert y_TD[5:].abs().sum() > 0
    assert aux.noop_fraction.item() == pytest.approx(0.5)
    assert aux.counts_E.tolist() == [5, 0]  # real experts only
    # An all-no-op batch leaves the experts without gradient.
    x_TD = x_TD[:5].clone().requires_grad_(True)
    y_TD, aux = layer(x_TD)
    assert aux.noop_fraction.item() == 1.0
    y_TD.sum().backward()
    for p in layer.experts.parameters():
        assert p.grad is None or p.grad.abs().sum() == 0


def test_router_is_fp32_and_gets_gradient_through_gates() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 12, MoEConfig(num_experts=4, top_k=2, capacity_factor=None))
    assert layer.router_DE.dtype == torch.float32
    y_TD, _ = layer(torch.randn(6, 8))
    y_TD.sum().backward()
    assert layer.router_DE.grad is not None and layer.router_DE.grad.abs().sum() > 0


def test_dispatcher_is_swappable_and_called_once() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 12, MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=0))
    x_TD = torch.randn(12, 8)
    y_ref, _ = layer(x_TD)
    calls: list[int] = []

    class Counting(LocalDispatcher):
        def __call__(self, x, plan, experts):  # type: ignore[no-untyped-def]
            calls.append(plan.capacity)
            return super().__call__(x, plan, experts)

    layer.dispatcher = Counting()
    y_TD, _ = layer(x_TD)
    assert calls == [6]  # ceil(1.0 * 12 * 2 / 4)
    assert torch.equal(y_TD, y_ref)


def test_local_dispatcher_refuses_a_sliced_bank() -> None:
    layer = MoELayer(8, 12, MoEConfig(num_experts=4, top_k=2))
    layer.experts.keep_slice(2, 2)
    with pytest.raises(RuntimeError, match="needs all 4 experts"):
        layer(torch.randn(3, 8))


def test_shared_experts_add_one_ungated_swiglu_on_every_token() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=0)
    plain = MoELayer(8, 12, cfg, init_std=0.3)
    shared_cfg = MoEConfig(**{**vars(cfg), "shared_experts": 2})
    shared = MoELayer(8, 12, shared_cfg, init_std=0.3)
    shared.load_state_dict(plain.state_dict(), strict=False)  # same router and bank
    assert shared.shared is not None and shared.shared.w_gate.out_features == 2 * 12
    x_TD = torch.randn(10, 8)
    with torch.no_grad():
        y_TD, aux = plain(x_TD)
        z_TD, aux_shared = shared(x_TD)
        # Same routing, drops included; one more addend: the same fp32 sum.
        torch.testing.assert_close(z_TD, y_TD + shared.shared(x_TD), rtol=0, atol=0)
        assert torch.equal(aux.counts_E, aux_shared.counts_E)
        logits_TE = shared.router_logits(x_TD)
        want = plain.dropless_local(x_TD, logits_TE) + shared.shared(x_TD)
        torch.testing.assert_close(shared.dropless_local(x_TD, logits_TE), want, rtol=0, atol=0)
