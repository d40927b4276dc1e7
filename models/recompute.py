"""Activation checkpointing per block, with the forward's routing decisions replayed.

A checkpointed block keeps only its inputs for backward; when the backward first needs
one of its activations, ``torch.utils.checkpoint`` (non-reentrant) runs the block's
forward again. For MoE and MoD blocks that second forward must take exactly the
decisions of the first: which positions a MoD block processes, which experts each token
picks, which assignments capacity drops, and so the all-to-all split sizes every rank
of an expert-parallel group agreed on. Recomputing them would usually give the same
answer (same inputs, same code), but a last-bit difference in a router matmul (GPU
libraries do not promise bitwise repeatability) can flip a near tie, and the
aux-loss-free expert bias is a buffer that a step could move. So a :class:`Tape` records
every decision of the first forward (``decide``) and the recompute replays them:

- integer decisions (MoD positions, expert ids, slots, kept mask, counts, the peers'
  counts of the all-to-all) come back from the tape unchanged; the top-k sorts and the
  count exchange do not run again;
- the gates, which are differentiable functions of the router logits, come back with
  the planner's exact values and the gradient of the softmax at the recorded experts
  (renormalised as configured) w.r.t. the recomputed logits: the fused planner's own
  backward formula. The first forward goes through the same replay step (the decision
  is made without a graph, then re-gated), so both runs save the same tensors.

Aux losses and counters are return values of the block: the caller sees the first
forward's, once; the recompute's outputs are discarded by ``torch.utils.checkpoint``
and its aux losses get their gradient through the first forward's graph. Early stop is
off, so a recompute runs the whole block and every rank issues the same collectives.

Shape legend: T tokens of a layer, E router columns, K top-k choices.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.utils.checkpoint as ckpt
from torch.utils._pytree import tree_flatten, tree_unflatten

from turnout.config.choices import Recompute
from turnout.config.model import BlockKind
from turnout.models.kernels import gate_grad_rows
from turnout.models.routing import RoutingPlan

T = TypeVar("T")

_local = threading.local()


class RecomputeMismatch(RuntimeError):
    """The recompute asked for other decisions than the forward made (a bug, not data)."""


def recomputes(kind: BlockKind, mode: str) -> bool:
    """Whether a block of ``kind`` is checkpointed under ``train.activation_checkpointing``."""
    if mode == Recompute.FULL:
        return True
    if mode == Recompute.MOE:
        return kind.has_moe
    if mode == Recompute.NONE:
        return False
    raise ValueError(f"activation checkpointing must be {Recompute.spelled()}, got {mode!r}")


def _frozen(value: Any) -> Any:
    """``value`` with every tensor detached (what the tape keeps: no graph, no grad)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, RoutingPlan):
        return dataclasses.replace(value, gate_TK=value.gate_TK.detach())
    if isinstance(value, tuple):
        return tuple(_frozen(v) for v in value)
    return value


class Tape:
    """The routing decisions of one checkpointed block call, in call order."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Any]] = []
        self.recorded = False
        """True after the first forward: every later run replays."""
        self.cursor = 0

    @property
    def replaying(self) -> bool:
        return self.recorded

    def decide(self, tag: str, compute: Callable[[], T], replay: Callable[[T], T]) -> T:
        if not self.replaying:
            # The decision itself builds no graph; ``replay`` adds what is differentiable,
            # so both runs save the same tensors for backward and compute the same values.
            with torch.no_grad():
                value = _frozen(compute())
            self.entries.append((tag, value))
            return replay(value)
        if self.cursor >= len(self.entries) or self.entries[self.cursor][0] != tag:
            have = [t for t, _ in self.entries]
            raise RecomputeMismatch(
                f"recompute asked for decision {self.cursor} {tag!r}; the forward made {have}"
            )
        _, value = self.entries[self.cursor]
        self.cursor += 1
        return replay(value)

    def nbytes(self) -> int:
        """Bytes of the tensors the tape keeps."""
        total = 0
        for _, value in self.entries:
            parts = value if isinstance(value, tuple) else (value,)
            for part in parts:
                if isinstance(part, RoutingPlan):
                    part = (part.expert_TK, part.gate_TK, part.slot_TK, part.keep_TK, part.counts_E)
                for t in part if isinstance(part, tuple) else (part,):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total

    @contextmanager
    def active(self) -> Iterator[None]:
        """Install the tape for one run of the block: record the first, replay the rest."""
        prev = getattr(_local, "tape", None)
        _local.tape = self
        self.cursor = 0
        try:
            yield
        finally:
            _local.tape = prev
        if self.replaying and self.cursor != len(self.entries):
            raise RecomputeMismatch(
                f"recompute used {self.cursor} of the forward's {len(self.entries)} decisions"
            )
        self.recorded = True


def current() -> Tape | None:
    """The tape of the checkpointed block running on this thread (None outside one)."""
    return getattr(_local, "tape", None)


def _same(value: T) -> T:
    return value


def decide(tag: str, compute: Callable[[], T], replay: Callable[[T], T] = _same) -> T:
    """``compute()`` outside a checkpointed block; inside one, the first forward records
    its result and the recompute gets ``replay(recorded)`` without computing again."""
    tape = current()
    if tape is None:
        return compute()
    return tape.decide(tag, compute, replay)


class _Gates(torch.autograd.Function):
    """The planner's gate values, differentiable w.r.t. the router logits again."""

    @staticmethod
    def forward(
        ctx: Any,
        logits_TE: torch.Tensor,
        expert_TK: torch.Tensor,
        gate_TK: torch.Tensor,
        normalize: bool,
    ) -> torch.Tensor:
        ctx.normalize = normalize
        ctx.save_for_backward(logits_TE, expert_TK, gate_TK)
        return gate_TK.clone()

    @staticmethod
    def backward(ctx: Any, grad_TK: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits_TE, expert_TK, gate_TK = ctx.saved_tensors
        grad_TE = gate_grad_rows(logits_TE, expert_TK, gate_TK, grad_TK, ctx.normalize)
        return grad_TE, None, None, None


def regated(plan: RoutingPlan, logits_TE: torch.Tensor, normalize_gates: bool) -> RoutingPlan:
    """A recorded plan whose gates carry the gradient w.r.t. ``logits_TE`` again: the
    recorded values exactly, the gradient of ``softmax(logits)`` at the recorded experts
    (renormalised over them when ``normalize_gates``), as the fused planner's backward."""
    gate_TK = _Gates.apply(logits_TE.float(), plan.expert_TK, plan.gate_TK, normalize_gates)
    return dataclasses.replace(plan, gate_TK=gate_TK)


class _Boundary(torch.autograd.Function):
    """Identity on one differentiable output of a block that saves one (empty) tensor.

    Unpacking a saved tensor is what makes ``torch.utils.checkpoint`` recompute, so the
    recompute runs here, at the block's edge, before the backward of any module inside
    it. Without it the first unpack can sit inside the last module's backward, after
    ZeRO-3's pre-backward hook gathered that module's weights: the recompute's
    post-forward hooks would then release them again and the gradient would be
    accumulated into an empty parameter. One node per output: a joint node would pull
    the backward into the block through an output that has no gradient (zeros).
    """

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(t.new_empty(0))
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        ctx.saved_tensors  # noqa: B018 - the unpack that triggers the recompute
        return grad


def _at_boundary(out: T) -> T:
    """``out`` with every tensor that requires grad passed through a :class:`_Boundary`."""
    leaves, spec = tree_flatten(out)
    for i, v in enumerate(leaves):
        if isinstance(v, torch.Tensor) and v.requires_grad:
            leaves[i] = _Boundary.apply(v)
    result: T = tree_unflatten(leaves, spec)
    return result


def checkpointed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` keeping only its inputs for backward; the backward runs it
    again with the routing decisions of this call (see the module docstring), before the
    backward of any module inside ``fn`` (see :class:`_Boundary`)."""
    tape = Tape()

    def run(*a: Any, **kw: Any) -> T:
        with tape.active():
            return _at_boundary(fn(*a, **kw))

    with ckpt.set_checkpoint_early_stop(False):
        out: T = ckpt.checkpoint(run, *args, use_reentrant=False, **kwargs)
    return out
