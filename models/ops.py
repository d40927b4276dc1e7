"""The routing ops the layers call: fused kernels from csrc/ when built, else the reference.

Every layer calls routing through this module (never ``routing`` directly), so that one
switch decides between the fused ``torch.ops.turnout`` kernels (C++ on CPU, CUDA on GPU;
built on first use by :mod:`turnout.models.kernels`) and the pure-PyTorch reference in
:mod:`turnout.models.routing`. ``TURNOUT_KERNELS=0`` forces the reference. Both return
the same :class:`RoutingPlan`; gates stay differentiable w.r.t. the router logits.

Shape legend: T tokens, E router columns (real + no-op), K top-k, D width, C capacity,
B batch, S positions, M MoD-chosen positions per sequence, N = B * S rows.
"""

from __future__ import annotations

import torch

from turnout.models import kernels, recompute
from turnout.models import routing as _ref
from turnout.models.routing import RoutingPlan

Tensor = torch.Tensor

#: Router columns the CUDA plan handles (per-warp column histograms live in shared
#: memory); defined in csrc/routing.h, read from there.
CUDA_MAX_COLUMNS = kernels.header_constant("kMaxCudaColumns")


def backend() -> str:
    """'fused' when the csrc/ kernels are loaded and used by default, else 'reference'."""
    return "fused" if kernels.load() else "reference"


def _fused(t: Tensor, columns: int = 0) -> bool:
    if not kernels.supports(t):
        return False
    return t.device.type == "cpu" or columns <= CUDA_MAX_COLUMNS


def moe_plan(
    logits_TE: Tensor,
    top_k: int,
    capacity: int | None,
    normalize_gates: bool,
    num_experts: int | None = None,
    selection_bias: Tensor | None = None,
) -> RoutingPlan:
    """Token-choice top-k plan; same contract as :func:`routing.moe_plan`.

    With a ``selection_bias`` the kernel plans from the (detached) biased logits and the
    gates are then taken from the unbiased probabilities, as the reference does. Inside
    a checkpointed block the recompute replays the forward's plan (:mod:`recompute`).
    """
    return recompute.decide(
        "moe_plan",
        lambda: _moe_plan(logits_TE, top_k, capacity, normalize_gates, num_experts, selection_bias),
        lambda plan: recompute.regated(plan, logits_TE, normalize_gates),
    )


def _moe_plan(
    logits_TE: Tensor,
    top_k: int,
    capacity: int | None,
    normalize_gates: bool,
    num_experts: int | None,
    selection_bias: Tensor | None,
) -> RoutingPlan:
    E = logits_TE.shape[1]
    if not _fused(logits_TE, E):
        return _ref.moe_plan(
            logits_TE, top_k, capacity, normalize_gates, num_experts, selection_bias
        )
    n_real = E if num_experts is None else num_experts
    cap_arg = -1 if capacity is None else int(capacity)
    select_TE = logits_TE.float()
    if selection_bias is not None:
        select_TE = _ref.selection_logits(logits_TE, selection_bias).detach()
    expert_TK, gate_TK, slot_TK, keep_TK, counts_E = torch.ops.turnout.moe_plan(
        select_TE, top_k, cap_arg, normalize_gates, n_real
    )
    if selection_bias is not None:
        gate_TK = _ref.gates_of(torch.softmax(logits_TE.float(), -1), expert_TK, normalize_gates)
    cap = None if capacity is None else int(capacity)
    return RoutingPlan(expert_TK, gate_TK, slot_TK, keep_TK, counts_E, cap, n_real)


def mod_select(scores_BS: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """MoD top-k positions per sequence: ``idx_BM`` (position order), ``chosen_BS``
    (replayed, not recomputed, inside a checkpointed block)."""
    return recompute.decide("mod_select", lambda: _mod_select(scores_BS, k))


def _mod_select(scores_BS: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if not _fused(scores_BS):
        return _ref.mod_select(scores_BS, k)
    return torch.ops.turnout.mod_select(scores_BS.float(), k)


def mode_plan(
    scores_BS: Tensor,
    k: int,
    logits_NE: Tensor,
    top_k: int,
    capacity: int | None,
    normalize_gates: bool,
    num_experts: int | None = None,
    selection_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, RoutingPlan]:
    """Fused MoDE plan: the MoD choice and the expert plan of the chosen tokens only.

    ``logits_NE`` has one router row per position (row ``b * S + s``); the plan's tokens
    are the chosen positions in (batch, position) order, ``T = B * k``. Equal to
    ``mod_select`` followed by ``moe_plan`` on the chosen rows. No-op columns beyond
    ``num_experts`` make it integrated MoDE. ``capacity`` is for the ``B * k`` tokens.
    ``selection_bias`` as in :func:`moe_plan`. Replayed inside a checkpointed block.
    """

    def replay(
        decided: tuple[Tensor, Tensor, RoutingPlan],
    ) -> tuple[Tensor, Tensor, RoutingPlan]:
        idx_BM, chosen_BS, plan = decided
        rows_T = _ref.chosen_rows(idx_BM, scores_BS.shape[1])
        return idx_BM, chosen_BS, recompute.regated(plan, logits_NE[rows_T], normalize_gates)

    return recompute.decide(
        "mode_plan",
        lambda: _mode_plan(
            scores_BS, k, logits_NE, top_k, capacity, normalize_gates, num_experts, selection_bias
        ),
        replay,
    )


def _mode_plan(
    scores_BS: Tensor,
    k: int,
    logits_NE: Tensor,
    top_k: int,
    capacity: int | None,
    normalize_gates: bool,
    num_experts: int | None,
    selection_bias: Tensor | None,
) -> tuple[Tensor, Tensor, RoutingPlan]:
    E = logits_NE.shape[1]
    n_real = E if num_experts is None else num_experts
    if not _fused(logits_NE, E):
        idx_BM, chosen_BS = _ref.mod_select(scores_BS, k)
        rows_T = _ref.chosen_rows(idx_BM, scores_BS.shape[1])
        plan = _ref.moe_plan(
            logits_NE[rows_T], top_k, capacity, normalize_gates, num_experts, selection_bias
        )
        return idx_BM, chosen_BS, plan
    cap_arg = -1 if capacity is None else int(capacity)
    select_NE = logits_NE.float()
    if selection_bias is not None:
        select_NE = _ref.selection_logits(logits_NE, selection_bias).detach()
    idx_BM, chosen_BS, expert_TK, gate_TK, slot_TK, keep_TK, counts_E = torch.ops.turnout.mode_plan(
        scores_BS.float(), k, select_NE, top_k, cap_arg, normalize_gates, n_real
    )
    if selection_bias is not None:
        rows_T = _ref.chosen_rows(idx_BM, scores_BS.shape[1])
        probs_TE = torch.softmax(logits_NE[rows_T].float(), -1)
        gate_TK = _ref.gates_of(probs_TE, expert_TK, normalize_gates)
    cap = None if capacity is None else int(capacity)
    plan = RoutingPlan(expert_TK, gate_TK, slot_TK, keep_TK, counts_E, cap, n_real)
    return idx_BM, chosen_BS, plan


def _gate(plan: RoutingPlan, dtype: torch.dtype) -> Tensor:
    """The gates in the kernels' accumulation type for ``dtype``."""
    return plan.gate_TK.to(kernels.opmath(dtype))


def permute(x_TD: Tensor, plan: RoutingPlan) -> Tensor:
    """Gather token rows into capacity buckets ``[E, C, D]`` (empty rows are zero).

    The bucket path (this, a batched GEMM per bucket, :func:`combine`) is no layer's path:
    it is the oracle of the experts' kept-rows path (``models/dispatch.py``) and the
    subject of the kernels' own tests.
    """
    if not _fused(x_TD):
        return _ref.permute(x_TD, plan)
    C = _ref.bucket_rows(plan)
    return torch.ops.turnout.permute(
        x_TD, plan.expert_TK, plan.slot_TK, plan.keep_TK, None, plan.num_experts, C
    )


def combine(y_ECD: Tensor, plan: RoutingPlan) -> Tensor:
    """Gate-weighted sum of each token's kept expert outputs: ``[T, D]``."""
    if not _fused(y_ECD):
        return _ref.combine(y_ECD, plan)
    return torch.ops.turnout.combine(
        y_ECD, plan.expert_TK, plan.slot_TK, plan.keep_TK, _gate(plan, y_ECD.dtype)
    )
