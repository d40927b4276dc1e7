"""Mixture-of-Depths (models/mod.py): one test per trap listed in docs/design.md, and more.

Shape suffixes: B batch, S sequence, M chosen positions per sequence, D width.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.decisions import recorded
from turnout.config.model import BLOCK_KINDS, MoDConfig, ModelConfig, MoEConfig
from turnout.models.block import Block
from turnout.models.layers import Rotary
from turnout.models.mod import MoDBlock, masked_dense
from turnout.models.routing import mod_capacity, mod_select
from turnout.models.terms import Term

pytestmark = pytest.mark.unit


D, H, S = 16, 2, 12
# Compacted vs masked-dense (and batched vs one sequence) run the same math through other
# shapes: attention over M chosen keys vs a masked S, GEMMs of other row counts. Outputs of
# magnitude ~3 agree to ~5e-7 (measured); rtol = atol = 1e-5 leaves 20x.
TOL = 1e-5


def _cfg(capacity: float = 0.25, **mod: object) -> ModelConfig:
    return ModelConfig(
        d_model=D,
        n_heads=H,
        ffn_dim=32,
        max_seq_len=64,
        n_layers=1,
        init_std=0.2,
        moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=None),
        mod=MoDConfig(capacity=capacity, **mod),  # type: ignore[arg-type]
    )


def _mod(ffn: str = "dense", seed: int = 0, **kw: object) -> MoDBlock:
    torch.manual_seed(seed)
    cfg = _cfg(**kw)  # type: ignore[arg-type]
    block = Block(cfg, Rotary(D // H, cfg.max_seq_len, cfg.rope_theta), BLOCK_KINDS[ffn])
    for p in block.parameters():  # visible increments, not ~0.02-scale ones
        torch.nn.init.normal_(p, std=0.3)
    mod = MoDBlock(cfg, block)
    torch.nn.init.normal_(mod.router.weight, std=0.5)
    return mod


def _pos(B: int, S_: int = S) -> torch.Tensor:
    return torch.arange(S_).expand(B, S_)


def _chosen(mod: MoDBlock, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mod_select(mod.scores(x_BSD), mod_capacity(x_BSD.shape[1], mod.capacity))


# ---------------------------------------------------------------- exact k, ties


@pytest.mark.parametrize(
    ("S_", "cap", "k"), [(12, 0.25, 3), (10, 0.125, 2), (8, 1.0, 8), (3, 0.01, 1)]
)
def test_capacity_is_ceil(S_: int, cap: float, k: int) -> None:
    assert mod_capacity(S_, cap) == k == min(S_, max(1, math.ceil(cap * S_)))


def test_exact_k_with_ties() -> None:
    # k = 2; the k-th largest value (2.0) is shared by three positions. A strict '>' against
    # it would select 1 token; '>=' would select 4. Exactly 2, lower positions first.
    scores_BS = torch.tensor([[3.0, 2.0, 2.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    idx_BM, chosen_BS = mod_select(scores_BS, 2)
    assert idx_BM.tolist() == [[0, 1], [0, 1]]
    assert chosen_BS.sum(1).tolist() == [2, 2]
    assert (scores_BS > scores_BS.gather(1, idx_BM)[:, -1:]).sum(1).tolist() == [1, 0]


def test_block_processes_exactly_k_per_sequence_even_when_all_scores_tie() -> None:
    mod = _mod()
    with torch.no_grad():
        mod.router.weight.zero_()  # every score 0: all tie
    x_BSD = torch.randn(3, S, D)
    out_BSD, aux = mod(x_BSD, _pos(3))
    changed_BS = (out_BSD != x_BSD).any(-1)
    assert changed_BS.sum(1).tolist() == [3, 3, 3]  # k = ceil(0.25 * 12)
    assert changed_BS[:, :3].all()  # ties go to the lower positions
    assert aux[Term.MOD_CAPACITY].item() == pytest.approx(3 / 12)


# ---------------------------------------------------------------- position order


def test_chosen_indices_in_position_order() -> None:
    torch.manual_seed(0)
    scores_BS = torch.randn(4, 20)
    idx_BM, chosen_BS = mod_select(scores_BS, 5)
    assert torch.equal(idx_BM, idx_BM.sort(-1).values)
    for b in range(4):
        assert idx_BM[b].tolist() == torch.nonzero(chosen_BS[b]).flatten().tolist()
        top = sorted(range(20), key=lambda s, b=b: (-scores_BS[b, s].item(), s))[:5]
        assert sorted(top) == idx_BM[b].tolist()


def test_descending_scores_keep_causal_order() -> None:
    # The router ranks later positions higher, so top-k order is the reverse of position
    # order; the compacted run must still attend causally by original position.
    mod = _mod()
    x_BSD = torch.randn(2, S, D)
    with torch.no_grad():
        mod.router.weight.zero_()
        mod.router.weight[0, 0] = 1.0
        x_BSD[:, :, 0] = torch.arange(S, dtype=torch.float32)  # score grows with position
    idx_BM, chosen_BS = _chosen(mod, x_BSD)
    assert idx_BM.tolist() == [[9, 10, 11]] * 2
    out_BSD, _ = mod(x_BSD, _pos(2))
    ref_BSD, _ = masked_dense(mod, x_BSD, _pos(2), mod.scores(x_BSD), chosen_BS)
    torch.testing.assert_close(out_BSD, ref_BSD, rtol=TOL, atol=TOL)


# ---------------------------------------------------------------- unchosen bit-identical


def test_unchosen_tokens_bit_identical() -> None:
    mod = _mod()
    x_BSD = torch.randn(3, S, D)
    out_BSD, _ = mod(x_BSD, _pos(3))
    _, chosen_BS = _chosen(mod, x_BSD)
    assert torch.equal(out_BSD[~chosen_BS], x_BSD[~chosen_BS])
    assert not torch.equal(out_BSD[chosen_BS], x_BSD[chosen_BS])


# ---------------------------------------------------------------- router scales the increment


@pytest.mark.parametrize("gate", ["sigmoid", "identity"])
def test_chosen_output_is_x_plus_gate_times_block_increment(gate: str) -> None:
    mod = _mod(router_gate=gate)
    B = 2
    x_BSD = torch.randn(B, S, D)
    out_BSD, _ = mod(x_BSD, _pos(B))
    idx_BM, _ = _chosen(mod, x_BSD)
    x_BMD = x_BSD.gather(1, idx_BM.unsqueeze(-1).expand(-1, -1, D))
    pos_BM = _pos(B).gather(1, idx_BM)
    blk_BMD, _ = mod.block(x_BMD, pos_BM)  # Block.forward = x + (block(x) - x)
    r_BM = (x_BMD @ mod.router.weight[0]).unsqueeze(-1)
    g_BM1 = torch.sigmoid(r_BM) if gate == "sigmoid" else r_BM
    got_BMD = out_BSD.gather(1, idx_BM.unsqueeze(-1).expand(-1, -1, D))
    torch.testing.assert_close(got_BMD, x_BMD + g_BM1 * (blk_BMD - x_BMD), rtol=TOL, atol=TOL)
    # The trap: scaling the block's full output (which already holds the residual).
    wrong_BMD = x_BMD + g_BM1 * blk_BMD
    assert (got_BMD - wrong_BMD).abs().max() > 1e-2


# ---------------------------------------------------------------- RoPE at real positions


def test_rope_uses_real_positions_not_0_to_k() -> None:
    mod = _mod()
    B = 2
    x_BSD = torch.randn(B, S, D)
    out_BSD, _ = mod(x_BSD, _pos(B))
    idx_BM, chosen_BS = _chosen(mod, x_BSD)
    assert idx_BM.ne(torch.arange(idx_BM.shape[1])).any()  # not trivially 0..k-1
    x_BMD = x_BSD.gather(1, idx_BM.unsqueeze(-1).expand(-1, -1, D))
    g_BM1 = torch.sigmoid(mod.scores(x_BSD).gather(1, idx_BM)).unsqueeze(-1)
    # The trap: positions 0..k-1 for the compacted tokens.
    delta0_BMD, _ = mod.block.increment(x_BMD, torch.arange(idx_BM.shape[1]).expand_as(idx_BM))
    wrong_BSD = x_BSD.scatter(1, idx_BM.unsqueeze(-1).expand(-1, -1, D), x_BMD + g_BM1 * delta0_BMD)
    assert (out_BSD - wrong_BSD).abs().max() > 1e-3
    ref_BSD, _ = masked_dense(mod, x_BSD, _pos(B), mod.scores(x_BSD), chosen_BS)
    torch.testing.assert_close(out_BSD, ref_BSD, rtol=TOL, atol=TOL)
    assert (ref_BSD - wrong_BSD).abs().max() > 1e-3


def test_rope_offset_positions_are_honoured() -> None:
    # Shifting every position changes nothing relative (RoPE), but shifting only the
    # chosen tokens' positions unevenly would; the block must read pos_BS, not arange.
    mod = _mod()
    x_BSD = torch.randn(1, S, D)
    a_BSD, _ = mod(x_BSD, _pos(1))
    b_BSD, _ = mod(x_BSD, _pos(1) + 7)
    # RoPE's relative invariance is exact in real arithmetic only: the cos/sin of p + 7 round
    # otherwise than those of p (~1e-7 each). Measured 0 here; 1e-4 is loose but the shift
    # that must show (below) moves the output by > 1e-3.
    torch.testing.assert_close(a_BSD, b_BSD, rtol=1e-4, atol=1e-5)
    c_BSD, _ = mod(x_BSD, _pos(1) * 2)
    assert (a_BSD - c_BSD).abs().max() > 1e-3


# ---------------------------------------------------------------- compacted == masked dense


@pytest.mark.parametrize(
    ("ffn", "moe"),
    [
        ("dense", None),
        ("moe", MoEConfig(num_experts=4, top_k=2, capacity_factor=None)),
        ("moe", MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5, min_capacity=0)),
    ],
    ids=["dense", "moe-dropless", "moe-capacity"],
)
def test_compacted_equals_masked_dense(ffn: str, moe: MoEConfig | None) -> None:
    mod = _mod(ffn)
    if moe is not None:
        mod.block.ffn.cfg = moe  # type: ignore[union-attr]
    B = 3
    x_BSD = torch.randn(B, S, D)
    out_BSD, aux = mod(x_BSD, _pos(B))
    score_BS = mod.scores(x_BSD)
    _, chosen_BS = _chosen(mod, x_BSD)
    with recorded(mod) as decisions:
        ref_BSD, aux_ref = masked_dense(mod, x_BSD, _pos(B), score_BS, chosen_BS)
    # The MoD choice comes from the same scores in both forms; the expert top-2 (and with it
    # which assignments capacity drops) from router logits of other attention shapes.
    decisions.assert_clear("masked-dense MoE router")
    torch.testing.assert_close(out_BSD, ref_BSD, rtol=TOL, atol=TOL)
    if moe is not None:
        assert torch.equal(aux[Term.MOE_COUNTS], aux_ref[Term.MOE_COUNTS])
        assert aux[Term.MOE_DROP].item() == aux_ref[Term.MOE_DROP].item()
        if moe.capacity_factor is not None:
            assert aux[Term.MOE_DROP].item() > 0  # the capacity case really drops


def test_batch_rows_do_not_leak() -> None:
    # A batch-offset bug (flat indices without b * S) mixes rows across sequences:
    # changing sequence 1 must leave sequence 0's output untouched.
    mod = _mod()
    x_BSD = torch.randn(2, S, D)
    y_BSD = x_BSD.clone()
    y_BSD[1] = torch.randn(S, D)
    a_BSD, _ = mod(x_BSD, _pos(2))
    b_BSD, _ = mod(y_BSD, _pos(2))
    assert torch.equal(a_BSD[0], b_BSD[0])


# ---------------------------------------------------------------- gradient to the router


def test_router_receives_gradient() -> None:
    mod = _mod()
    x_BSD = torch.randn(2, S, D, requires_grad=True)
    out_BSD, _ = mod(x_BSD, _pos(2))
    out_BSD.pow(2).sum().backward()
    assert mod.router.weight.grad is not None
    assert mod.router.weight.grad.abs().sum() > 0
    assert x_BSD.grad is not None and torch.isfinite(x_BSD.grad).all()
    # The predictor sees a stop-gradient input: the LM loss alone gives it no gradient.
    assert all(p.grad is None for p in mod.predictor.parameters())  # type: ignore[union-attr]


# ---------------------------------------------------------------- no softmax over the sequence


def test_score_of_a_token_does_not_depend_on_other_tokens() -> None:
    mod = _mod()
    x_BSD = torch.randn(1, S, D)
    y_BSD = x_BSD.clone()
    y_BSD[0, 1:] = 5 * torch.randn(S - 1, D)
    sx, sy = mod.scores(x_BSD), mod.scores(y_BSD)
    assert sx[0, 0].item() == sy[0, 0].item()  # bitwise: the same GEMM shape, the same row
    # nn.Linear vs a hand dot product: 16 fp32 products whose magnitudes sum to ~5 for a score
    # of ~0.8, so another summation order moves it by up to a few ulps of 5 (~1e-6, i.e.
    # ~1e-6 relative to the score): 1e-5 relative (was 1e-6, at the edge of that bound).
    dot = (x_BSD[0, 0] @ mod.router.weight[0]).item()
    assert sx[0, 0].item() == pytest.approx(dot, rel=1e-5)
    # and the gate is the per-token sigmoid: no normalisation over positions
    assert torch.softmax(sx, -1).sum().item() == pytest.approx(1.0)
    assert torch.sigmoid(sx).sum().item() != pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------- vectorised over the batch


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_batch_equals_each_sequence_alone(ffn: str) -> None:
    mod = _mod(ffn)  # the MoE in _cfg is dropless, so tokens do not compete across rows
    B = 4
    x_BSD = torch.randn(B, S, D)
    with recorded(mod) as decisions:
        out_BSD, aux = mod(x_BSD, _pos(B))
    # One sequence alone computes MoD scores and router logits with GEMMs of other row counts.
    decisions.assert_clear("batched MoD top-k and MoE router")
    for b in range(B):
        one_BSD, _ = mod(x_BSD[b : b + 1], _pos(1))
        # ~2e-7 measured on outputs of magnitude ~3: rtol 1e-5 leaves 50x.
        torch.testing.assert_close(out_BSD[b : b + 1], one_BSD, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- decode path


@pytest.mark.parametrize("predictor", ["mlp", "router"])
def test_causal_decode_at_s1_follows_predictor(predictor: str) -> None:
    mod = _mod(predictor=predictor)
    x_B1D = torch.randn(3, 1, D)
    pos_B1 = torch.tensor([[5], [0], [11]])
    # Top-k at S=1 always chooses the token (the trap); causal mode asks the predictor.
    assert mod_capacity(1, mod.capacity) == 1
    last = mod.predictor[-1] if predictor == "mlp" else None  # type: ignore[index]
    with torch.no_grad():
        if last is not None:
            last.weight.zero_()
            last.bias.fill_(-4.0)
        else:
            mod.router.weight.zero_()
            mod.router.weight[0, 0] = -1.0  # score = -x[0]
            x_B1D[:, 0, 0] = torch.tensor([2.0, -2.0, 3.0])  # scores -2, +2, -3
    out_B1D, aux = mod(x_B1D, pos_B1, routing="causal")
    pred_B = mod.causal_logits(x_B1D, mod.scores(x_B1D))[:, 0]
    decide_B = pred_B > 0
    assert decide_B.tolist() == ([False] * 3 if last is not None else [False, True, False])
    for b in range(3):
        if decide_B[b]:
            # chosen: the block on that single token at its real position
            blk, _ = mod.block(x_B1D[b : b + 1], pos_B1[b : b + 1])
            g = mod.gate(mod.scores(x_B1D[b : b + 1]))[0, 0]
            expected = x_B1D[b] + g * (blk[0] - x_B1D[b])
            # Masked-dense over B = 3 vs the plain block on one token: ~1e-7 measured.
            torch.testing.assert_close(out_B1D[b], expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out_B1D[b], x_B1D[b])
    assert aux[Term.MOD_CAPACITY].item() == pytest.approx(decide_B.float().mean().item())
    if last is not None:  # flip the predictor: every token chosen
        with torch.no_grad():
            last.bias.fill_(4.0)
        out_B1D, aux = mod(x_B1D, pos_B1, routing="causal")
        assert (out_B1D != x_B1D).any(-1).all()
        assert aux[Term.MOD_CAPACITY].item() == 1.0


def test_causal_mode_over_a_sequence_equals_definition() -> None:
    # An arbitrary (non top-k) per-token choice: masked dense is the block's definition,
    # computed by hand here on the compacted chosen tokens.
    mod = _mod()
    x_BSD = torch.randn(2, S, D)
    last = mod.predictor[-1]  # type: ignore[index]
    with torch.no_grad():
        mod.predictor[0].weight.zero_()  # type: ignore[index]
        mod.predictor[0].bias.zero_()  # type: ignore[index]
        last.weight.zero_()
        last.bias.fill_(-1.0)
    out_BSD, _ = mod(x_BSD, _pos(2), routing="causal")
    assert torch.equal(out_BSD, x_BSD)  # nothing chosen
    chosen_BS = torch.zeros(2, S, dtype=torch.bool)
    chosen_BS[0, [1, 4, 5]] = True
    chosen_BS[1, [0, 11]] = True
    ref_BSD, _ = masked_dense(mod, x_BSD, _pos(2), mod.scores(x_BSD), chosen_BS)
    for b in range(2):
        idx = torch.nonzero(chosen_BS[b]).flatten()
        blk, _ = mod.block(x_BSD[b : b + 1, idx], _pos(1)[:, idx])
        g = mod.gate(mod.scores(x_BSD[b : b + 1, idx]))[0].unsqueeze(-1)
        exp = x_BSD[b, idx] + g * (blk[0] - x_BSD[b, idx])
        torch.testing.assert_close(ref_BSD[b, idx], exp, rtol=TOL, atol=TOL)


def test_unknown_routing_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="routing"):
        _mod()(torch.randn(1, S, D), _pos(1), routing="sample")


# ---------------------------------------------------------------- auxiliary targets, B > 1


def test_aux_targets_are_per_sequence_topk_for_b_gt_1() -> None:
    mod = _mod()
    B = 3
    x_BSD = torch.randn(B, S, D)
    _, aux = mod(x_BSD, _pos(B))
    scores_BS = mod.scores(x_BSD)
    pred_BS = mod.causal_logits(x_BSD, scores_BS)
    target_BS = torch.zeros(B, S)
    for b in range(B):  # built sequence by sequence, by hand
        order = sorted(range(S), key=lambda s, b=b: (-scores_BS[b, s].item(), s))
        target_BS[b, order[:3]] = 1.0
    expected = F.binary_cross_entropy_with_logits(pred_BS, target_BS)
    # The same predictor outputs and loss function: only the target's construction differs.
    assert aux[Term.MOD_PRED_LOSS].item() == pytest.approx(expected.item(), rel=1e-6)
    acc = ((pred_BS > 0).float() == target_BS).float().mean().item()
    assert aux[Term.MOD_PRED_ACC].item() == pytest.approx(acc)


def test_causal_mode_targets_are_topk_not_own_decisions() -> None:
    # In causal mode the block runs on the predictor's decisions, but the predictor's
    # loss and accuracy must still be measured against top-k membership.
    mod = _mod()
    last = mod.predictor[-1]  # type: ignore[index]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-6.0)  # predicts "not chosen" everywhere
    x_BSD = torch.randn(2, S, D)
    _, aux = mod(x_BSD, _pos(2), routing="causal")
    assert aux[Term.MOD_CAPACITY].item() == 0.0  # realised: nothing processed
    assert aux[Term.MOD_PRED_ACC].item() == pytest.approx(1 - 3 / 12)  # the base rate
    assert aux[Term.MOD_PRED_LOSS].item() > 1.0  # the 3 top-k tokens per row cost ~6 nats each


def test_causal_predictor_learns() -> None:
    mod = _mod(predictor_hidden=64)
    B = 8
    x_BSD = torch.randn(B, 32, D)
    pos = _pos(B, 32)
    opt = torch.optim.Adam(mod.predictor.parameters(), lr=3e-3)  # type: ignore[union-attr]
    with torch.no_grad():
        _, aux = mod(x_BSD, pos)
    first = aux[Term.MOD_PRED_ACC].item()
    for _ in range(150):
        _, aux = mod(x_BSD, pos)
        opt.zero_grad()
        aux[Term.MOD_PRED_LOSS].backward()
        opt.step()
    with torch.no_grad():
        _, aux = mod(x_BSD, pos)
        _, causal = mod(x_BSD, pos, routing="causal")
    base = 1 - mod_capacity(32, mod.capacity) / 32  # always answering "skip"
    assert base == 0.75
    assert aux[Term.MOD_PRED_ACC].item() > 0.9 > base
    assert aux[Term.MOD_PRED_ACC].item() > first
    # the causal decisions now realise roughly the trained capacity
    assert abs(causal["mod_capacity"].item() - 0.25) < 0.1


# ---------------------------------------------------------------- MoE router on the block input


def _block_routed(capacity_factor: float | None = None, seed: int = 0) -> MoDBlock:
    """A 'mode' block whose MoE router reads the block input (model.moe.router_input)."""
    torch.manual_seed(seed)
    cfg = _cfg()
    cfg.moe = MoEConfig(
        num_experts=4, top_k=2, capacity_factor=capacity_factor, min_capacity=0,
        router_input="block",
    )  # fmt: skip
    block = Block(cfg, Rotary(D // H, cfg.max_seq_len, cfg.rope_theta), BLOCK_KINDS["mode"])
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    mod = MoDBlock(cfg, block)
    torch.nn.init.normal_(mod.router.weight, std=0.5)
    assert mod.routes_from_block_input
    return mod


@pytest.mark.parametrize("cf", [None, 0.5], ids=["dropless", "capacity"])
def test_block_router_compacted_equals_masked_dense(cf: float | None) -> None:
    mod = _block_routed(cf)
    B = 3
    x_BSD = torch.randn(B, S, D)
    out_BSD, aux = mod(x_BSD, _pos(B))
    _, chosen_BS = _chosen(mod, x_BSD)
    ref_BSD, aux_ref = masked_dense(mod, x_BSD, _pos(B), mod.scores(x_BSD), chosen_BS)
    torch.testing.assert_close(out_BSD, ref_BSD, rtol=TOL, atol=TOL)
    assert torch.equal(aux[Term.MOE_COUNTS], aux_ref[Term.MOE_COUNTS])
    assert aux[Term.MOE_DROP].item() == aux_ref[Term.MOE_DROP].item()
    torch.testing.assert_close(aux[Term.MOE_LB], aux_ref[Term.MOE_LB])
    torch.testing.assert_close(aux[Term.MOE_Z], aux_ref[Term.MOE_Z])
    if cf is not None:
        assert aux[Term.MOE_DROP].item() > 0  # the capacity case really drops


def test_block_router_aux_losses_use_block_input_logits_of_routed_rows() -> None:
    mod = _block_routed()
    x_BSD = torch.randn(2, S, D)
    _, aux = mod(x_BSD, _pos(2))
    _, chosen_BS = _chosen(mod, x_BSD)
    logits_TE = x_BSD[chosen_BS] @ mod.block.moe().router_DE  # block input, chosen rows
    z = torch.logsumexp(logits_TE, -1).pow(2).mean()
    torch.testing.assert_close(aux[Term.MOE_Z], z)
    assert int(aux[Term.MOE_COUNTS].sum()) == 2 * int(chosen_BS.sum())  # top-2 of each row


def test_block_router_fused_plan_equals_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from turnout.models import ops

    calls: list[str] = []
    real = ops.mode_plan

    def counted(*args, **kwargs):  # the real op, counted: the layer must call it
        calls.append(ops.backend())
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "mode_plan", counted)
    mod = _block_routed(0.5)
    x_BSD = torch.randn(3, S, D)
    results = []
    for kernels in ("1", "0"):
        monkeypatch.setenv("TURNOUT_KERNELS", kernels)
        mod.zero_grad()
        out_BSD, aux = mod(x_BSD, _pos(3))
        loss = out_BSD.square().sum() + aux[Term.MOE_LB] + aux[Term.MOE_Z]
        loss.backward()
        grads = [p.grad.clone() for p in (mod.router.weight, mod.block.moe().router_DE)]
        results.append((out_BSD.detach(), aux[Term.MOE_COUNTS], grads))
    assert calls == ["fused", "reference"]
    (fused_out, fused_counts, fused_grads), (ref_out, ref_counts, ref_grads) = results
    torch.testing.assert_close(fused_out, ref_out)
    assert torch.equal(fused_counts, ref_counts)
    for a, b in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_block_router_gets_gradient_through_gates_and_aux() -> None:
    mod = _block_routed()
    router_DE = mod.block.moe().router_DE
    x_BSD = torch.randn(2, S, D)
    out_BSD, aux = mod(x_BSD, _pos(2))
    out_BSD.pow(2).sum().backward(retain_graph=True)  # through the gates only
    assert router_DE.grad is not None and router_DE.grad.abs().sum() > 0
    assert mod.router.weight.grad is not None and mod.router.weight.grad.abs().sum() > 0
    router_DE.grad = None
    aux[Term.MOE_Z].backward()  # the aux loss alone reaches the router too
    assert router_DE.grad is not None and router_DE.grad.abs().sum() > 0


def test_block_router_causal_mode_plans_the_chosen_rows() -> None:
    mod = _block_routed()
    x_BSD = torch.randn(2, S, D)
    chosen_BS = torch.zeros(2, S, dtype=torch.bool)
    chosen_BS[0, [1, 4, 5]] = True
    chosen_BS[1, [0, 11]] = True
    out_BSD, aux = masked_dense(mod, x_BSD, _pos(2), mod.scores(x_BSD), chosen_BS)
    assert torch.equal(out_BSD[~chosen_BS], x_BSD[~chosen_BS])
    assert int(aux[Term.MOE_COUNTS].sum()) == 2 * 5
    last = mod.predictor[-1]  # type: ignore[index]
    with torch.no_grad():  # the predictor chooses every token: the plan covers all rows
        last.weight.zero_()
        last.bias.fill_(5.0)
    out_BSD, aux = mod(x_BSD, _pos(2), routing="causal")
    assert aux[Term.MOD_CAPACITY].item() == 1.0
    assert int(aux[Term.MOE_COUNTS].sum()) == 2 * 2 * S
    assert torch.isfinite(out_BSD).all()
