"""Pure-PyTorch reference for all routing math (the oracle for the kernels in csrc/).

It follows the routing rules of docs/design.md word for word; the fused kernels must
reproduce it (indices, slots, drops and counts bit-exact; gates to float tolerance).

Shape legend (suffixes on tensor names):
    T  tokens reaching a layer on this rank        E  router choices (experts, incl. no-op)
    K  top-k choices per token                     D  model width
    C  per-expert capacity (bucket rows)           B  batch (sequences)
    S  sequence length                             M  MoD-chosen positions per sequence

Tie rule (everywhere): among equal scores the lower index wins (expert id for MoE
top-k, position for MoD top-k). It is what a stable descending sort gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: Slack under a ceil() of a float product: float noise (1.1 * 50 * 2 / 2 =
#: 55.00000000000001) must not add a whole row or position.
CEIL_SLACK = 1e-9


@dataclass
class RoutingPlan:
    """Who goes where: one row per token, one column per top-k choice.

    ``slot_TK`` is the assignment's position inside its expert's bucket in GShard
    priority (all first choices before any second choice, then by token index),
    counted before dropping. ``keep_TK`` is true for assignments that are dispatched:
    to a real (not no-op) expert and ``slot < capacity``. ``capacity`` is None in
    dropless mode: every real assignment is kept, and nothing in routing or in the
    experts' kept-rows path needs a size (the bucket oracle sizes its buckets itself,
    :func:`bucket_rows`, with the host sync that takes).
    """

    expert_TK: Tensor
    gate_TK: Tensor
    slot_TK: Tensor
    keep_TK: Tensor
    counts_E: Tensor
    capacity: int | None
    num_experts: int

    @property
    def num_tokens(self) -> int:
        return self.expert_TK.shape[0]

    def dropped_fraction(self) -> Tensor:
        """Fraction of real-expert assignments that were dropped for capacity."""
        real_K = self.expert_TK < self.num_experts
        n_real = real_K.sum().clamp_min(1)
        return (real_K & ~self.keep_TK).sum().float() / n_real.float()


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None, min_capacity: int
) -> int | None:
    """C = max(min_capacity, ceil(capacity_factor * T * k / E)); None when dropless."""
    if capacity_factor is None:
        return None
    raw = capacity_factor * num_tokens * top_k / num_experts
    return max(int(min_capacity), int(math.ceil(raw - CEIL_SLACK)))


def topk_stable(scores: Tensor, k: int, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Top-k along ``dim``, largest first, ties broken by the lower index."""
    values, order = torch.sort(scores, dim=dim, descending=True, stable=True)
    return values.narrow(dim, 0, k), order.narrow(dim, 0, k)


def gshard_slots(expert_TK: Tensor, num_choices: int) -> tuple[Tensor, Tensor]:
    """Slot of each assignment in its expert's bucket, GShard order; and counts per choice.

    Returns ``slot_TK`` (long) and ``counts_E`` (long, over all ``num_choices`` columns).
    """
    T, K = expert_TK.shape
    # Choice-major order: all first choices (token 0..T-1), then all second choices, ...
    onehot_KTE = F.one_hot(expert_TK.t().reshape(-1), num_choices).view(K * T, num_choices)
    position_KTE = torch.cumsum(onehot_KTE, dim=0) - 1
    slot_KT = position_KTE.gather(1, expert_TK.t().reshape(-1, 1)).view(K, T)
    counts_E = onehot_KTE.sum(0)
    return slot_KT.t().contiguous(), counts_E


def bucket_rows(plan: RoutingPlan) -> int:
    """Rows per expert bucket of ``plan`` for the bucket oracle (:func:`permute`): the
    capacity, or dropless the largest expert count (0 without experts; a host sync)."""
    if plan.capacity is not None:
        return plan.capacity
    return int(plan.counts_E.max().item()) if plan.counts_E.numel() else 0


def selection_logits(logits_TE: Tensor, bias_E: Tensor) -> Tensor:
    """The logits the top-k choice reads: ``bias_E`` added to the first ``len(bias_E)``
    (real-expert) columns; any further (no-op) columns are left as they are."""
    n = bias_E.shape[0]
    pad_E = F.pad(bias_E.to(logits_TE.device, torch.float32), (0, logits_TE.shape[1] - n))
    return logits_TE.float() + pad_E


def gates_of(probs_TE: Tensor, expert_TK: Tensor, normalize_gates: bool) -> Tensor:
    """The gates of the chosen columns: their probabilities (renormalised to sum 1)."""
    gate_TK = probs_TE.gather(1, expert_TK)
    if normalize_gates:
        gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)
    return gate_TK


def moe_plan(
    logits_TE: Tensor,
    top_k: int,
    capacity: int | None,
    normalize_gates: bool,
    num_experts: int | None = None,
    selection_bias: Tensor | None = None,
) -> RoutingPlan:
    """Token-choice top-k routing plan (reference).

    ``logits_TE`` has E router columns; the first ``num_experts`` are real experts and
    any further columns are no-op experts (integrated MoDE), which are never dispatched.
    ``capacity=None`` is dropless: every real-expert assignment is kept.
    ``selection_bias`` (one value per real expert, aux-loss-free balancing) is added to
    the logits for the top-k choice only: the choice is the top-k of
    ``softmax(selection_logits)`` while the gates stay the unbiased probabilities.
    """
    logits_TE = logits_TE.float()
    E_total = logits_TE.shape[1]
    n_real = E_total if num_experts is None else num_experts
    probs_TE = torch.softmax(logits_TE, dim=-1)
    if selection_bias is None:
        gate_TK, expert_TK = topk_stable(probs_TE, top_k)
        if normalize_gates:
            gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)
    else:
        biased_TE = torch.softmax(selection_logits(logits_TE, selection_bias), dim=-1)
        _, expert_TK = topk_stable(biased_TE, top_k)
        gate_TK = gates_of(probs_TE, expert_TK, normalize_gates)
    slot_TK, counts_all = gshard_slots(expert_TK, E_total)
    counts_E = counts_all[:n_real]
    real_TK = expert_TK < n_real
    if capacity is None:
        cap = None
        keep_TK = real_TK
    else:
        cap = int(capacity)
        keep_TK = real_TK & (slot_TK < cap)
    return RoutingPlan(expert_TK, gate_TK, slot_TK, keep_TK, counts_E, cap, n_real)


def load_balance_loss(probs_TE: Tensor, expert_TK: Tensor) -> Tensor:
    """E * sum_e f_e * P_e over all router columns; f_e counts assignments before drops."""
    T, E = probs_TE.shape
    K = expert_TK.shape[1]
    counts_E = torch.zeros(E, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.scatter_add_(
        0, expert_TK.reshape(-1), torch.ones_like(expert_TK, dtype=probs_TE.dtype).reshape(-1)
    )
    f_E = counts_E / max(T * K, 1)
    # sum / max(T, 1) rather than mean: no tokens (a MoD block that chose none) gives 0, not NaN.
    P_E = probs_TE.sum(dim=0) / max(T, 1)
    return E * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """mean over tokens of logsumexp(logits)^2 (in fp32); 0 when there are no tokens."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1).pow(2)
    return z_T.sum() / max(z_T.numel(), 1)


def permute(x_TD: Tensor, plan: RoutingPlan) -> Tensor:
    """Gather token rows into capacity buckets ``[E, C, D]`` (empty rows are zero).

    The bucket path (``permute`` -> a batched GEMM per bucket -> :func:`combine`) is the
    oracle of the experts' kept-rows path (``models/dispatch.py``) and of the kernels.
    """
    T, D = x_TD.shape
    buckets_ECD = x_TD.new_zeros(plan.num_experts, bucket_rows(plan), D)
    keep = plan.keep_TK
    token_TK = torch.arange(T, device=x_TD.device).unsqueeze(1).expand_as(plan.expert_TK)
    buckets_ECD[plan.expert_TK[keep], plan.slot_TK[keep]] = x_TD[token_TK[keep]]
    return buckets_ECD


def combine(y_ECD: Tensor, plan: RoutingPlan) -> Tensor:
    """Weighted sum of each token's kept expert outputs: ``[T, D]``.

    Dropped and no-op assignments add nothing; their gate is not redistributed.
    """
    T = plan.num_tokens
    D = y_ECD.shape[-1]
    keep = plan.keep_TK
    token_TK = torch.arange(T, device=y_ECD.device).unsqueeze(1).expand_as(plan.expert_TK)
    rows_ND = y_ECD[plan.expert_TK[keep], plan.slot_TK[keep]]
    weighted_ND = rows_ND * plan.gate_TK[keep].unsqueeze(1).to(rows_ND.dtype)
    out_TD = y_ECD.new_zeros(T, D)
    return out_TD.index_add(0, token_TK[keep], weighted_ND)


def mod_capacity(seq_len: int, capacity: float) -> int:
    """Positions a MoD block processes per sequence: ceil(capacity * S), in [1, S]."""
    return min(seq_len, max(1, int(math.ceil(capacity * seq_len - CEIL_SLACK))))


def mod_select(scores_BS: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Expert-choice top-k over positions, per sequence.

    Returns ``idx_BM`` (the chosen positions in increasing position order) and the
    boolean ``chosen_BS`` mask. Exactly k positions per sequence, ties to the lower
    position.
    """
    _, idx_BM = topk_stable(scores_BS.float(), k, dim=-1)
    idx_BM, _ = torch.sort(idx_BM, dim=-1)
    chosen_BS = torch.zeros_like(scores_BS, dtype=torch.bool)
    chosen_BS.scatter_(1, idx_BM, True)
    return idx_BM, chosen_BS


def chosen_rows(idx_BM: Tensor, seq_len: int) -> Tensor:
    """Flat row ``b * S + s`` of each chosen position, in (batch, position) order: ``[B * M]``."""
    B = idx_BM.shape[0]
    return (idx_BM + torch.arange(B, device=idx_BM.device).unsqueeze(1) * seq_len).reshape(-1)
