"""Expert-parallel MoE layer == the single-process reference (spawned gloo ranks).

Reference semantics: rank r's tokens go through the plain ``MoELayer`` with
``LocalDispatcher`` on r's tokens alone (capacity is a function of the config and the
per-rank T, so the reference computes it from the same T). Outputs, input gradients
and router gradients must equal rank r's reference; a local expert's gradient must
equal the sum over the ranks of the expert-parallel group of the reference gradients
of that expert (every EP peer's tokens may visit it). Dropless mode is also compared
with one reference call over the concatenated tokens of the EP group.
"""

from __future__ import annotations

import pytest
import torch

from tests.margins import assert_clear, topk_gap
from tests.spawn import run_ranks
from tests.tiny import tiny_mode_cfg
from turnout.config.model import MoEConfig
from turnout.models import ops
from turnout.models.lm import TransformerLM
from turnout.models.moe import MoELayer
from turnout.models.terms import Term
from turnout.parallel.groups import Layout

pytestmark = pytest.mark.distributed

D, F, E = 8, 16, 4

# name: (capacity_factor, tokens per rank, special)
SCENARIOS_W2 = {
    "cap_equal": (1.0, [12, 12], ""),
    "cap_fewer_tokens": (1.0, [12, 5], ""),
    "cap_rank_without_tokens": (1.25, [10, 0], ""),
    "cap_idle_experts": (1.0, [10, 10], "idle"),
    "cap_all_dropped": (1.0, [10, 10], "dropped"),
    "dl_fewer_tokens": (None, [12, 5], ""),
    "dl_rank_without_tokens": (None, [9, 0], ""),
    "dl_idle_experts": (None, [10, 10], "idle"),
    "dl_all_dropped": (None, [10, 10], "dropped"),
}
SCENARIOS_W4 = {
    "cap_dp2_ep2": (1.0, [8, 6, 8, 3], ""),
    "dl_dp2_ep2": (None, [8, 6, 8, 3], ""),
}


def _build(spec: tuple) -> tuple[MoELayer, list[torch.Tensor], list[torch.Tensor]]:
    """The layer (seed 0), each rank's input and loss weights; identical on every process."""
    cf, Ts, special = spec
    torch.manual_seed(0)
    noop = 2 if special == "dropped" else 0
    cfg = MoEConfig(num_experts=E, top_k=2, capacity_factor=cf, min_capacity=1)
    layer = MoELayer(D, F, cfg, init_std=0.3, num_noop=noop)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(t, D, generator=gen) for t in Ts]
    ws = [torch.randn(t, D, generator=gen) for t in Ts]
    with torch.no_grad():
        if special == "idle":  # feature 0 > 0 and a router that sends nothing to experts 2, 3
            for x in xs:
                x[:, 0] = 4.0
            layer.router_DE[0, :2] = 3.0
            layer.router_DE[0, 2:] = -3.0
        if special == "dropped":  # rank 1's tokens all pick the two no-op experts
            xs[0][:, 0] = -4.0
            xs[1][:, 0] = 4.0
            layer.router_DE[0, :E] = -3.0
            layer.router_DE[0, E:] = 3.0
    return layer, xs, ws


def _loss(layer: MoELayer, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y, aux = layer(x)
    return y, (y * w).sum() + 0.1 * aux.load_balance + 0.01 * aux.z_loss


def _layer_worker(rank: int, world: int, scenarios: dict) -> dict:
    from turnout.parallel.expert_parallel import install_expert_parallel
    from turnout.parallel.groups import build_groups

    groups = build_groups(2)
    out = {}
    for name, spec in scenarios.items():
        layer, xs, ws = _build(spec)
        install_expert_parallel(layer, groups)
        x = xs[rank].clone().requires_grad_()
        y, loss = _loss(layer, x, ws[rank])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        out[name] = {
            "y": y.detach(),
            "dx": x.grad,
            "grads": grads,
            "rows": layer.dispatcher.rows_sent,
        }
    return out


def _reference(spec: tuple) -> list[dict]:
    layer, xs, ws = _build(spec)
    refs = []
    for x0, w in zip(xs, ws, strict=True):
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        y, loss = _loss(layer, x, w)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        refs.append({"y": y.detach(), "dx": x.grad, "grads": grads})
    return refs


def _check(results: list[dict], scenarios: dict, world: int) -> None:
    lay = Layout(world, 2)
    for name, spec in scenarios.items():
        refs = _reference(spec)
        for rank in range(world):
            got, ref = results[rank][name], refs[rank]
            msg = f"{name} rank {rank}"
            torch.testing.assert_close(got["y"], ref["y"], msg=msg)
            torch.testing.assert_close(got["dx"], ref["dx"], msg=msg)
            torch.testing.assert_close(
                got["grads"]["router_DE"], ref["grads"]["router_DE"], msg=msg
            )
            off, cnt = lay.expert_slice(rank, E)
            for pname, g in got["grads"].items():
                if not pname.startswith("experts."):
                    continue
                want = sum(refs[s]["grads"][pname][off : off + cnt] for s in lay.ep_ranks(rank))
                torch.testing.assert_close(g, want, msg=f"{msg} {pname}")
        if spec[0] is None:  # dropless: also one call over the EP group's concatenated tokens
            layer, xs, _ = _build(spec)
            for grp in lay.all_ep_groups():
                x_cat = torch.cat([xs[r] for r in grp])
                # Router logits from a GEMM of other row count than the ranks' own: the same
                # top-2 only where no token is near a tie (the ranks' own comparisons above
                # route from bitwise the same logits as their reference).
                gap = topk_gap(layer.router_logits(x_cat).detach(), layer.top_k)
                assert_clear(gap, f"{name}: router top-2 of the concatenated tokens")
                y_cat, _ = layer(x_cat)
                torch.testing.assert_close(
                    y_cat, torch.cat([results[r][name]["y"] for r in grp]), msg=name
                )


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ranks(_layer_worker, 2, SCENARIOS_W2)


@pytest.mark.parametrize("name", list(SCENARIOS_W2))
def test_layer_matches_reference_world2(world2: list[dict], name: str) -> None:
    _check(world2, {name: SCENARIOS_W2[name]}, 2)


def test_edge_cases_really_happen(world2: list[dict]) -> None:
    # The edge-case scenarios must exercise what they claim (no test that cannot fail).
    layer, xs, _ = _build(SCENARIOS_W2["cap_idle_experts"])
    assert all(layer(x)[1].counts_E[2:].sum() == 0 for x in xs)
    layer, xs, _ = _build(SCENARIOS_W2["dl_all_dropped"])
    assert layer(xs[1])[1].counts_E.sum() == 0 and layer(xs[0])[1].counts_E.sum() > 0
    assert torch.all(world2[1]["dl_all_dropped"]["y"] == 0)
    assert world2[1]["dl_all_dropped"]["rows"] == 0
    assert world2[1]["dl_rank_without_tokens"]["rows"] == 0
    # Dropless ships only real rows: sent rows == kept assignments.
    layer, xs, _ = _build(SCENARIOS_W2["dl_fewer_tokens"])
    assert world2[0]["dl_fewer_tokens"]["rows"] == 2 * xs[0].shape[0]
    assert world2[1]["dl_fewer_tokens"]["rows"] == 2 * xs[1].shape[0]
    # Capacity mode ships only kept rows too (no padding to the group's largest capacity
    # C = ceil(1.0 * 12 * 2 / 4) = 6): sent rows == this rank's kept assignments.
    layer, xs, _ = _build(SCENARIOS_W2["cap_fewer_tokens"])
    for r, x in enumerate(xs):
        cap = layer.capacity(x.shape[0])
        plan = ops.moe_plan(layer.router_logits(x), 2, cap, layer.cfg.gates_normalized(), E)
        assert world2[r]["cap_fewer_tokens"]["rows"] == int(plan.keep_TK.sum())
    assert world2[1]["cap_fewer_tokens"]["rows"] < E * 6


def test_layer_matches_reference_world4_dp2_ep2() -> None:
    results = run_ranks(_layer_worker, 4, SCENARIOS_W4)
    _check(results, SCENARIOS_W4, 4)


# -- MoDE under expert parallelism ----------------------------------------------------

B, S = 2, 8


def _lm_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    tok = torch.randint(0, 32, (B, S + 1), generator=gen)
    return tok[:, :-1], tok[:, 1:]


def _mode_worker(rank: int, world: int) -> dict:
    from turnout.parallel.expert_parallel import install_expert_parallel
    from turnout.parallel.groups import build_groups

    groups = build_groups(2)
    out = {}
    for cf in (1.25, None):
        torch.manual_seed(0)
        model = TransformerLM(tiny_mode_cfg(cf, 0.25, S))
        (layer,) = install_expert_parallel(model, groups)
        tokens, targets = _lm_batch(rank)
        res = model(tokens, targets)
        res.loss.backward()
        out[cf] = {
            "logits": res.logits.detach(),
            "loss": res.loss.detach(),
            "counts": res.stats[1][Term.MOE_COUNTS],
            "rows": layer.dispatcher.rows_sent,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        }
    return out


def test_mode_under_ep_only_chosen_tokens_travel() -> None:
    results = run_ranks(_mode_worker, 2)
    lay = Layout(2, 2)
    chosen = B * 2  # ceil(0.25 * 8) = 2 positions per sequence
    for cf in (1.25, None):
        torch.manual_seed(0)
        ref_model = TransformerLM(tiny_mode_cfg(cf, 0.25, S))
        refs = []
        for rank in range(2):
            ref_model.zero_grad()
            res = ref_model(*_lm_batch(rank))
            res.loss.backward()
            grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
            refs.append((res, grads))
        for rank in range(2):
            got, (ref, ref_grads) = results[rank][cf], refs[rank]
            torch.testing.assert_close(got["logits"], ref.logits)
            torch.testing.assert_close(got["loss"], ref.loss)
            # Counts and dispatch only see the MoD-chosen tokens.
            assert int(got["counts"].sum()) == chosen * 2
            if cf is None:
                assert got["rows"] == chosen * 2
            else:  # C from the chosen tokens: ceil(1.25 * 4 * 2 / 4) = 3, not from B*S;
                # only kept rows travel: min(count, C) per expert.
                assert got["rows"] == int(got["counts"].clamp(max=3).sum()) <= 4 * 3
            off, cnt = lay.expert_slice(rank, 4)
            for name, g in got["grads"].items():
                if ".experts." in name:
                    want = sum(refs[s][1][name][off : off + cnt] for s in lay.ep_ranks(rank))
                else:
                    want = ref_grads[name]
                torch.testing.assert_close(g, want, msg=f"cf={cf} rank {rank} {name}")
