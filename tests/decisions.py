"""Record the decision scores a model's forward computes, to check their margin from ties.

A test that compares two code paths through routing decisions (decode vs the causal
forward, a kernel vs the reference, expert parallelism vs one process) runs the reference
path under :func:`recorded` and checks that every decision it took was clear of its
boundary (:mod:`tests.margins`). Recorded, per call of a layer's ``forward``:

- MoE router: the selection logits (the router logits plus the selection bias, no-op
  columns included) and the top-k cut among them;
- MoD top-k routing: the router scores and the per-sequence top-k cut;
- MoD causal routing: the predictor logits and their sign (``CHOOSE_ABOVE_LOGIT``);
- recursion blocks: each recursion's top-k cut among the tokens still running (top-k
  routing), each routed recursion's predictor sign (causal), or the token router's top-1.

The gaps are measured on logits: the top-k of a softmax is the top-k of its logits, and
logits are the scores of order 1 that ``DECISION_MARGIN`` is sized for. The hooks recompute
each score from the layer's own input with the layer's own method, so they read the very
numbers the forward decides on. Decode (the blocks' ``decode_step``) calls the layers'
pieces, not their ``forward``: nothing is recorded there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tests.margins import DECISION_MARGIN, assert_clear, threshold_gap, topk_gap
from turnout.config.choices import Routing
from turnout.models.mod import CHOOSE_ABOVE_LOGIT, MoDBlock
from turnout.models.moe import MoELayer
from turnout.models.recursion import CHOOSE_ABOVE_LOGIT as REC_CHOOSE_ABOVE_LOGIT
from turnout.models.recursion import RecursionBlock
from turnout.models.routing import mod_capacity, mod_select, selection_logits


@dataclass
class Decisions:
    """``gaps[label]``: the distances from ties of every recorded call, in call order."""

    gaps: dict[str, list[float]] = field(default_factory=dict)

    def add(self, label: str, gap: float) -> None:
        self.gaps.setdefault(label, []).append(gap)

    def only(self, kind: str) -> Decisions:
        """The decisions whose label contains ``kind`` ('moe', 'mod top', 'mod predictor'):
        for a comparison whose two paths compute the other scores bitwise alike."""
        return Decisions({k: v for k, v in self.gaps.items() if kind in k})

    def min_gap(self) -> float:
        return min((g for gs in self.gaps.values() for g in gs), default=float("inf"))

    def worst(self) -> str:
        """The label of the narrowest decision (for messages)."""
        if not self.gaps:
            return "no decisions"
        return min(self.gaps, key=lambda k: min(self.gaps[k]))

    def assert_clear(self, what: str, margin: float = DECISION_MARGIN) -> None:
        """Every recorded decision is clear of its tie (trivially so when none was taken)."""
        assert_clear(self.min_gap(), f"{what}: {self.worst()}", margin)


def _moe_hook(label: str, out: Decisions):
    def hook(moe: MoELayer, args: tuple) -> None:
        x_TD = args[0]
        routed = args[1] if len(args) > 1 else None
        with torch.no_grad():
            logits_TE = moe.router_logits(x_TD) if routed is None else routed.logits_TE
            bias = moe.selection_bias()
            if bias is not None:
                logits_TE = selection_logits(logits_TE, bias)
            out.add(f"{label} moe top-{moe.top_k}", topk_gap(logits_TE.float(), moe.top_k))

    return hook


def _mod_hook(label: str, out: Decisions):
    def hook(mod: MoDBlock, args: tuple, kwargs: dict) -> None:
        x_BSD = args[0]
        routing = kwargs.get("routing", args[2] if len(args) > 2 else Routing.TOPK)
        with torch.no_grad():
            score_BS = mod.scores(x_BSD)
            if routing == Routing.CAUSAL:
                pred_BS = mod.causal_logits(x_BSD, score_BS)
                out.add(f"{label} mod predictor sign", threshold_gap(pred_BS, CHOOSE_ABOVE_LOGIT))
            else:
                k = mod_capacity(x_BSD.shape[1], mod.capacity)
                out.add(f"{label} mod top-{k}", topk_gap(score_BS, k))

    return hook


def _recursion_hook(label: str, out: Decisions):
    """A recursion block's decisions depend on the states of its earlier recursions: the
    hook reruns the block's own routing loop (no grad) to measure each one."""

    def hook(block: RecursionBlock, args: tuple, kwargs: dict) -> None:
        x_BSD, pos_BS = args[0], args[1]
        routing = kwargs.get("routing", args[2] if len(args) > 2 else Routing.TOPK)
        with torch.no_grad():
            if block.routing == "token":
                out.add(f"{label} recursion depth top-1", topk_gap(block.router(x_BSD).float(), 1))
                return
            if routing == Routing.CAUSAL:
                h_BSD = x_BSD
                run_BS = torch.ones(x_BSD.shape[:2], dtype=torch.bool, device=x_BSD.device)
                first: list = []
                first_BS = None
                for r in range(block.max_recursions):
                    score_BS = block.scores(h_BSD, r)
                    if r in block.decided():
                        logits_BS = block.causal_logits(h_BSD, score_BS, r)
                        out.add(
                            f"{label} recursion {r} predictor sign",
                            threshold_gap(logits_BS, REC_CHOOSE_ABOVE_LOGIT),
                        )
                        run_BS = run_BS & (logits_BS > REC_CHOOSE_ABOVE_LOGIT)
                    g_BS = block.gate(score_BS)
                    h_BSD = block._masked(h_BSD, pos_BS, run_BS, g_BS, r, first, first_BS)
                    first_BS = run_BS if first_BS is None else first_BS
                return
            h_BSD = x_BSD
            eligible_BS = torch.ones(x_BSD.shape[:2], dtype=torch.bool, device=x_BSD.device)
            kv: list = []
            for r in range(block.max_recursions):
                score_BS = block.scores(h_BSD, r)
                masked_BS = score_BS.masked_fill(~eligible_BS, torch.finfo(torch.float32).min)
                k = mod_capacity(x_BSD.shape[1], block.capacities[r])
                out.add(f"{label} recursion {r} top-{k}", topk_gap(masked_BS, k))
                idx_BM, eligible_BS = mod_select(masked_BS, k)
                h_BSD = block._compact(h_BSD, pos_BS, score_BS, idx_BM, r, kv)

    return hook


@contextmanager
def recorded(model: nn.Module) -> Iterator[Decisions]:
    """Record the routing decisions of every MoE, MoD and recursion layer of ``model``
    while inside."""
    out = Decisions()
    handles = []
    for name, m in model.named_modules():
        label = name or type(m).__name__
        if isinstance(m, MoELayer):
            handles.append(m.register_forward_pre_hook(_moe_hook(label, out)))
        elif isinstance(m, MoDBlock):
            handles.append(m.register_forward_pre_hook(_mod_hook(label, out), with_kwargs=True))
        elif isinstance(m, RecursionBlock):
            hook = _recursion_hook(label, out)
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
