"""Autograd-correct ``all_to_all_single`` over a process group.

Rows (dim 0) are exchanged: rank r sends ``input_splits[s]`` rows to rank s and
receives ``output_splits[s]`` rows from it; ``None`` splits mean even chunks. The
backward of an all-to-all is the reverse all-to-all (splits swapped), so gradients
travel back to the rank that sent each row.

Every rank of the group must call :func:`all_to_all` the same number of times in the
same order, forward and backward; :func:`all_to_all` therefore always enters the
autograd graph while grad mode is on (even for an input that does not require grad),
so a rank with no tokens still joins the backward exchange.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _exchange(
    x: torch.Tensor,
    out_splits: list[int] | None,
    in_splits: list[int] | None,
    group: Any,
) -> torch.Tensor:
    x = x.contiguous()
    if out_splits is None:
        out = torch.empty_like(x)
    else:
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        # Reverse exchange: what we received from s goes back to s.
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor,
    group: Any,
    output_splits: list[int] | None = None,
    input_splits: list[int] | None = None,
) -> torch.Tensor:
    """Exchange rows of ``x`` within ``group`` (differentiable).

    Even mode (both splits None): dim 0 must be divisible by the group size and the
    output has the shape of the input. Uneven mode: pass both split lists (row counts
    per peer, in group-rank order).
    """
    if (output_splits is None) != (input_splits is None):
        raise ValueError("pass both output_splits and input_splits, or neither")
    if torch.is_grad_enabled() and not x.requires_grad:
        # Join the graph anyway so the backward exchange happens on every rank.
        x = x.detach().requires_grad_(True)
    return _AllToAll.apply(x, output_splits, input_splits, group)


def exchange_counts(counts: torch.Tensor, group: Any) -> torch.Tensor:
    """Non-differentiable even all-to-all of an integer tensor (e.g. per-expert counts)."""
    return _exchange(counts, None, None, group)
