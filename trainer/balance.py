"""Aux-loss-free balancing: the once-per-optimizer-step update of the experts' bias.

Shape legend: R real experts of a layer.

:class:`BiasBalancer` sums each biased MoE layer's assignment counts over the micro steps
of one optimizer step (on the device, no host sync per micro step), then
:meth:`BiasBalancer.step` sums them over every rank in one all-reduce and hands the
global counts to :func:`turnout.models.moe.update_expert_bias`. Every rank routes its own
tokens with the replicated router (expert parallelism included), so the sum over all
ranks is the load of the whole data-parallel world; every rank then applies the same
deterministic update to the same bias and the replicas stay equal without a broadcast.
"""

from __future__ import annotations

import torch
from torch import nn

from turnout.models.lm import LMOutput
from turnout.models.moe import MoELayer, moe_by_layer, update_expert_bias
from turnout.models.terms import Term
from turnout.parallel.dist import all_reduce_sum


class BiasBalancer:
    """Counts of the biased MoE layers since the last optimizer step (this rank)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: dict[int, MoELayer] = {
            i: m for i, m in moe_by_layer(model).items() if m.expert_bias is not None
        }
        self.counts: dict[int, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        """Whether the model has any biased layer (else add/step do nothing)."""
        return bool(self.layers)

    def add(self, out: LMOutput) -> None:
        """Add one micro step's per-layer counts (before drops, real experts only)."""
        for i in self.layers:
            c_R = out.stats[i][Term.MOE_COUNTS].detach().to(torch.float64)
            self.counts[i] = self.counts[i] + c_R if i in self.counts else c_R

    def _zeros(self, i: int) -> torch.Tensor:
        bias = self.layers[i].expert_bias
        assert bias is not None
        return torch.zeros(bias.shape[0], dtype=torch.float64, device=bias.device)

    def step(self) -> dict[int, torch.Tensor]:
        """Collective when active: sum the counts over all ranks, move every bias one step;
        returns the global counts used (by layer index) and starts a new step."""
        if not self.active:
            return {}
        layers = sorted(self.layers)
        parts = [self.counts.get(i, self._zeros(i)) for i in layers]
        total = all_reduce_sum(torch.cat([p.to(parts[0].device) for p in parts]))
        sizes = [self.layers[i].num_experts for i in layers]
        global_counts = dict(zip(layers, torch.split(total, sizes), strict=True))
        update_expert_bias(self.model, global_counts)
        self.counts = {}
        return global_counts
