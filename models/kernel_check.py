"""Self-check of the loaded csrc/ kernels against the pure-PyTorch reference, per device.

The first time the fused ops would run on a device type (CPU, CUDA), :func:`mismatches`
runs each op on a small random problem there and compares it with
:mod:`turnout.models.routing`: indices, slots, keep masks and counts bit-exact, gates and
permuted/combined rows to float tolerance. Any difference (or an op raising) makes
:mod:`turnout.models.kernels` warn once and use the reference on that device: a kernel
that was never run on this GPU model cannot silently train a wrong model.

Shape legend: T tokens, E router columns, K top-k, D width, C capacity, B batch,
S positions, M chosen positions per sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from turnout.models import routing as ref
from turnout.models.routing import chosen_rows

#: Problem size of the check: big enough to hit ties, drops and several tiles.
CHECK_TOKENS = 300
CHECK_EXPERTS = 8
CHECK_TOP_K = 2
CHECK_CAPACITY = 60
CHECK_WIDTH = 16
CHECK_BATCH, CHECK_POSITIONS, CHECK_CHOSEN = 3, 50, 13
#: Gate and row tolerance (the kernels accumulate in fp32 like the reference).
CHECK_TOLERANCE = 1e-5

Ops = Callable[..., tuple[torch.Tensor, ...]]


def _equal(name: str, got: torch.Tensor, want: torch.Tensor, exact: bool) -> str | None:
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if exact:
        ok = torch.equal(got.to(want.dtype), want)
    else:
        ok = torch.allclose(got.float(), want.float(), atol=CHECK_TOLERANCE, rtol=CHECK_TOLERANCE)
    return None if ok else f"{name}: differs from the reference"


def compare_plan(name: str, got: tuple[torch.Tensor, ...], plan: ref.RoutingPlan) -> list[str]:
    """Differences between a kernel's (expert, gate, slot, keep, counts) and a plan."""
    want = (plan.expert_TK, plan.gate_TK, plan.slot_TK, plan.keep_TK, plan.counts_E)
    fields = ("expert", "gate", "slot", "keep", "counts")
    out = [
        _equal(f"{name}.{f}", g, w, exact=f != "gate")
        for f, g, w in zip(fields, got, want, strict=True)
    ]
    return [m for m in out if m]


def mismatches(device: torch.device, ops: Any = None) -> list[str]:
    """Run every fused op on ``device`` and list where it differs from the reference.

    ``ops`` defaults to ``torch.ops.turnout`` (tests pass a namespace with a broken op to
    see the check catch it).
    """
    ops = torch.ops.turnout if ops is None else ops
    gen = torch.Generator().manual_seed(0)
    T, E, K, C, D = CHECK_TOKENS, CHECK_EXPERTS, CHECK_TOP_K, CHECK_CAPACITY, CHECK_WIDTH
    # Rounded logits make ties, which exercise the lower-index tie rule.
    logits_TE = (torch.randn(T, E, generator=gen) * 4).round() / 4
    x_TD = torch.randn(T, D, generator=gen)
    scores_BS = (torch.randn(CHECK_BATCH, CHECK_POSITIONS, generator=gen) * 4).round() / 4
    logits_NE = torch.randn(CHECK_BATCH * CHECK_POSITIONS, E, generator=gen)
    out: list[str] = []
    try:
        plan = ref.moe_plan(logits_TE, K, C, True, E - 1)  # last column: a no-op expert
        got = ops.moe_plan(logits_TE.to(device), K, C, True, E - 1)
        out += compare_plan("moe_plan", got, plan)

        idx_BM, chosen_BS = ref.mod_select(scores_BS, CHECK_CHOSEN)
        got_idx, got_chosen = ops.mod_select(scores_BS.to(device), CHECK_CHOSEN)
        out += [
            m
            for m in (
                _equal("mod_select.idx", got_idx, idx_BM, exact=True),
                _equal("mod_select.chosen", got_chosen, chosen_BS, exact=True),
            )
            if m
        ]

        rows_T = chosen_rows(idx_BM, CHECK_POSITIONS)
        mode_ref = ref.moe_plan(logits_NE[rows_T], K, None, True, E)
        got = ops.mode_plan(
            scores_BS.to(device), CHECK_CHOSEN, logits_NE.to(device), K, -1, True, E
        )
        out += compare_plan("mode_plan", got[2:], mode_ref)

        buckets_ECD = ref.permute(x_TD, plan)
        e, s, k = (t.to(device) for t in (plan.expert_TK, plan.slot_TK, plan.keep_TK))
        got_b = ops.permute(x_TD.to(device), e, s, k, None, plan.num_experts, plan.capacity)
        out += [m for m in (_equal("permute", got_b, buckets_ECD, exact=False),) if m]
        combined_TD = ref.combine(buckets_ECD, plan)
        got_c = ops.combine(buckets_ECD.to(device), e, s, k, plan.gate_TK.to(device))
        out += [m for m in (_equal("combine", got_c, combined_TD, exact=False),) if m]
    except Exception as err:  # noqa: BLE001 - an op that raises has failed its check
        out.append(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}")
    return out
