"""Expert-parallel dispatcher: tokens travel to the ranks that own their experts.

Shape legend: T tokens on this rank, D width, E experts (global), L = E/ep local
experts, P = ep peers in the EP group, N kept assignments this rank sends, R rows it
receives.

The expert path of one process, ``turnout.models.dispatch.run_experts``, with an
all-to-all exchange in the middle; both modes take it and differ only in which
assignments the plan keeps (capacity mode drops slots >= C, dropless keeps every
real-expert assignment):

1. ``run_experts`` sorts the kept assignments expert-major (``expert_major``:
   destination rank, then local expert, then GShard slot) and gathers their token rows
   (one copy);
2. the exchange here sends the per-expert counts (one small all-to-all), then only the
   real rows with uneven splits: no capacity padding travels or gets multiplied;
3. it regroups the received ``[source p][local expert l]`` blocks expert-major (one
   gather), runs each local expert on exactly its rows (the bank's forward: one grouped
   GEMM per weight), undoes the regrouping;
4. the reverse all-to-all brings each row home in the order it left, and
   ``run_experts`` combines the gate-weighted rows into their tokens.

Ranks of an EP group may hold different T (MoD causal decisions, a ragged batch):
splits are per peer, so nothing has to agree but the count exchange.
"""

from __future__ import annotations

import torch

from turnout.models import recompute
from turnout.models.dispatch import run_experts
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
        """Token rows this rank sent to experts in the last call (kept assignments)."""

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
        E, P = plan.num_experts, self.ep
        L = E // P
        if E % P or experts.num_local != L or experts.expert_offset != self.ep_rank * L:
            raise RuntimeError(
                f"expert bank holds {experts.num_local}@{experts.expert_offset}; EP rank "
                f"{self.ep_rank} of {P} needs {E // P}@{self.ep_rank * (E // P)} of {E} experts"
            )
        return run_experts(x_TD, plan, experts, self._exchange)

    def _exchange(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, experts: ExpertBank
    ) -> torch.Tensor:
        """Rows to the ranks of their experts, through them, and back in the order sent."""
        P = self.ep
        L = counts_E.shape[0] // P
        # A checkpointed block's recompute reuses the counts its forward exchanged.
        recv_counts_PL = recompute.decide(
            "a2a_counts", lambda: exchange_counts(counts_E, self.group)
        ).view(P, L)
        in_splits = counts_E.view(P, L).sum(1).tolist()
        out_splits = recv_counts_PL.sum(1).tolist()
        self.rows_sent = int(rows_ND.shape[0])
        recv_RD = all_to_all(rows_ND, self.group, out_splits, in_splits)
        per_expert_L = recv_counts_PL.sum(0)
        # install_expert_parallel only installs this dispatcher at ep_size > 1, so P > 1.
        if L == 1:  # one expert per rank: the received [p][0] blocks are expert-major
            y_RD = experts(recv_RD, per_expert_L)
        else:
            gather_R = _expert_major_rows(recv_counts_PL)
            y_RD = experts(recv_RD.index_select(0, gather_R), per_expert_L)
            y_RD = torch.empty_like(y_RD).index_copy(0, gather_R, y_RD)
        return all_to_all(y_RD, self.group, in_splits, out_splits)

    def __repr__(self) -> str:
        mode = "dropless" if self.dropless else "capacity"
        return f"AllToAllDispatcher(ep={self.ep}, ep_rank={self.ep_rank}, {mode})"


def _expert_major_rows(recv_counts_PL: torch.Tensor) -> torch.Tensor:
    """Received row of each expert-major row: blocks arrive ``[p][l]``, experts want ``[l][p]``."""
    P, L = recv_counts_PL.shape
    src_counts = recv_counts_PL.reshape(-1)  # (p, l) blocks in receive order
    R = int(src_counts.sum())
    block_start = torch.cumsum(src_counts, 0) - src_counts
    blocks_LP = torch.arange(P * L, device=src_counts.device).view(P, L).t().reshape(-1)
    lens = src_counts[blocks_LP]
    starts = block_start[blocks_LP]
    within = torch.arange(R, device=src_counts.device) - torch.repeat_interleave(
        torch.cumsum(lens, 0) - lens, lens, output_size=R
    )
    return torch.repeat_interleave(starts, lens, output_size=R) + within
