"""Expert-parallel dispatcher: tokens travel to the ranks that own their experts.

Shape legend: T tokens on this rank, D width, E experts (global), L = E/ep local
experts, C capacity (rows per expert per source rank), P = ep peers in the EP group,
N rows this rank sends (dropless), R rows it receives (dropless).

Capacity mode (static shapes): permute the plan into buckets ``[E, C, D]``, one even
all-to-all (chunk p = the L experts of EP rank p), batched GEMMs on ``[L, P*C, D]``,
the reverse all-to-all, weighted combine. C is the plan's capacity, a function of the
config and this rank's T; if ranks of an EP group have different T (MoD causal
decisions, a ragged user batch) the buckets are zero-padded to the group's largest C
(one all-reduce of a scalar), so shapes always agree while each rank's drop decisions
stay those of its own plan.

Dropless mode (``capacity_factor: null``): per-expert counts are exchanged first, then
only the real rows travel with uneven splits; each local expert runs one GEMM chain on
exactly its rows (no padding).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from turnout.models import ops
from turnout.models.experts import ExpertBank
from turnout.models.routing import RoutingPlan
from turnout.parallel.alltoall import all_to_all, exchange_counts
from turnout.parallel.groups import ParallelGroups


class AllToAllDispatcher:
    """Implements the ``Dispatcher`` protocol of ``turnout.models.dispatch`` over an EP group."""

    def __init__(self, groups: ParallelGroups, dropless: bool) -> None:
        self.groups = groups
        self.group = groups.ep_group
        self.ep = groups.ep_size
        self.ep_rank = groups.ep_rank
        self.dropless = dropless
        self.rows_sent = 0
        """Token rows this rank sent to experts in the last call (padding included)."""

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
        E, P = plan.num_experts, self.ep
        L = E // P
        if E % P or experts.num_local != L or experts.expert_offset != self.ep_rank * L:
            raise RuntimeError(
                f"expert bank holds {experts.num_local}@{experts.expert_offset}; EP rank "
                f"{self.ep_rank} of {P} needs {E // P}@{self.ep_rank * (E // P)} of {E} experts"
            )
        if self.dropless:
            return self._dropless(x_TD, plan, experts, L)
        return self._capacity(x_TD, plan, experts, L)

    # -- capacity mode ------------------------------------------------------------------

    def _capacity(
        self, x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank, L: int
    ) -> torch.Tensor:
        E, P, C, D = plan.num_experts, self.ep, plan.capacity, x_TD.shape[1]
        cap = torch.tensor([C], dtype=torch.int64, device=x_TD.device)
        dist.all_reduce(cap, op=dist.ReduceOp.MAX, group=self.group)
        Cg = int(cap.item())
        buckets_ECD = ops.permute(x_TD, plan)
        if Cg > C:
            buckets_ECD = F.pad(buckets_ECD, (0, 0, 0, Cg - C))
        self.rows_sent = E * Cg
        recv = all_to_all(buckets_ECD.reshape(E * Cg, D), self.group)
        # recv rows: [source p][local expert l][slot] -> experts want [l][p, slot].
        x_LRD = recv.view(P, L, Cg, D).transpose(0, 1).reshape(L, P * Cg, D)
        y_LRD = experts(x_LRD)
        send = y_LRD.view(L, P, Cg, D).transpose(0, 1).reshape(E * Cg, D)
        back_ECD = all_to_all(send, self.group).view(E, Cg, D)
        if Cg > C:
            back_ECD = back_ECD[:, :C]
        return ops.combine(back_ECD, plan).to(x_TD.dtype)

    # -- dropless mode ------------------------------------------------------------------

    def _dropless(
        self, x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank, L: int
    ) -> torch.Tensor:
        E, P, D = plan.num_experts, self.ep, x_TD.shape[1]
        T = x_TD.shape[0]
        keep = plan.keep_TK
        expert_N = plan.expert_TK[keep]
        slot_N = plan.slot_TK[keep]
        token_TK = torch.arange(T, device=x_TD.device).unsqueeze(1).expand_as(plan.expert_TK)
        token_N = token_TK[keep]
        counts_E = torch.bincount(expert_N, minlength=E)
        # Row of each kept assignment in the expert-major send buffer. In dropless mode the
        # slots of expert e are exactly 0..counts_E[e]-1 (GShard order), so this is a
        # permutation of 0..N-1.
        offsets_E = torch.cumsum(counts_E, 0) - counts_E
        row_N = offsets_E[expert_N] + slot_N
        N = int(row_N.numel())
        order_N = torch.empty_like(row_N)
        order_N[row_N] = torch.arange(N, device=x_TD.device)
        send_ND = x_TD[token_N[order_N]]
        recv_counts_PL = exchange_counts(counts_E, self.group).view(P, L)
        in_splits = counts_E.view(P, L).sum(1).tolist()
        out_splits = recv_counts_PL.sum(1).tolist()
        self.rows_sent = N
        recv_RD = all_to_all(send_ND, self.group, out_splits, in_splits)
        # recv rows are [source p][local expert l][slot]; regroup expert-major.
        R = int(recv_RD.shape[0])
        src_counts = recv_counts_PL.reshape(-1)  # (p, l) blocks in receive order
        block_start = torch.cumsum(src_counts, 0) - src_counts
        blocks_LP = torch.arange(P * L, device=x_TD.device).view(P, L).t().reshape(-1)
        lens = src_counts[blocks_LP]
        starts = block_start[blocks_LP]
        # Expert-major order: for each local expert, for each source, that block's rows.
        within = torch.arange(R, device=x_TD.device) - torch.repeat_interleave(
            torch.cumsum(lens, 0) - lens, lens, output_size=R
        )
        gather_R = torch.repeat_interleave(starts, lens, output_size=R) + within
        per_expert = recv_counts_PL.sum(0).tolist()
        y_RD = grouped_experts(experts, recv_RD[gather_R], per_expert)
        # Undo the regrouping, send each row home.
        y_back = torch.empty_like(y_RD).index_copy(0, gather_R, y_RD)
        back_ND = all_to_all(y_back, self.group, in_splits, out_splits)
        rows_ND = back_ND[row_N].to(x_TD.dtype)
        weighted_ND = rows_ND * plan.gate_TK[keep].unsqueeze(1).to(rows_ND.dtype)
        return x_TD.new_zeros(T, D).index_add(0, token_N, weighted_ND)

    def __repr__(self) -> str:
        mode = "dropless" if self.dropless else "capacity"
        return f"AllToAllDispatcher(ep={self.ep}, ep_rank={self.ep_rank}, {mode})"


def grouped_experts(experts: ExpertBank, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Apply local expert l to its ``counts[l]`` consecutive rows (SwiGLU, no padding).

    The same math as ``ExpertBank.forward`` on one bucket, per expert segment. An expert
    with zero rows still runs (on an empty segment) so its weights stay in the autograd
    graph and every rank reduces the same expert gradients.
    """
    dtype = experts.w_gate_EDF.dtype
    x_RD = x_RD.to(dtype)
    # unbind, not w[l] per expert: the backward of one unbind stacks the L gradients once,
    # while L separate selects would each materialise a zero [L, D, F] gradient (O(L^2)).
    gates, ups, downs = (
        w.unbind(0) for w in (experts.w_gate_EDF, experts.w_up_EDF, experts.w_down_EFD)
    )
    outs = []
    for x_nD, w_g, w_u, w_d in zip(torch.split(x_RD, counts), gates, ups, downs, strict=True):
        outs.append((F.silu(x_nD @ w_g) * (x_nD @ w_u)) @ w_d)
    return torch.cat(outs, 0)
