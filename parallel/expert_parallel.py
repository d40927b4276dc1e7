"""Install expert parallelism into a plain model and describe its params to DeepSpeed.

``install_expert_parallel(model, groups)`` turns every :class:`MoELayer` of a plain
model (built identically on every rank, same seed) into its expert-parallel form:
the layer keeps only this EP rank's experts (``ExpertBank.keep_slice``), gets an
:class:`AllToAllDispatcher`, and its expert weights are marked the way DeepSpeed
recognises expert parameters (``allreduce = False``, ``group_name``).

DeepSpeed only routes expert gradients to the expert-data-parallel group when its
engine believes the model has MoE layers (``engine.has_moe_layers``), which it decides
by ``isinstance(module, deepspeed.moe.layer.MoE)``. :func:`prepare_for_deepspeed`
therefore attaches a parameter-free marker module of that class and registers our
groups in ``deepspeed.utils.groups`` under our group name; the optimizer must get
param groups from :func:`split_expert_param_groups` (experts in ``'moe': True`` groups).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from turnout.models.experts import ExpertBank
from turnout.models.moe import MoELayer, moe_layers
from turnout.parallel.ep_dispatcher import AllToAllDispatcher
from turnout.parallel.groups import ParallelGroups

MARKER_NAME = "deepspeed_moe_marker"


def install_expert_parallel(model: nn.Module, groups: ParallelGroups) -> list[MoELayer]:
    """Keep local experts, install the all-to-all dispatcher, mark expert params.

    Must run before the optimizer (or DeepSpeed engine) is built: ``keep_slice``
    replaces the expert ``nn.Parameter`` objects. A no-op for ``ep_size == 1``.
    """
    layers = moe_layers(model)
    if groups.ep_size == 1:
        return layers
    for layer in layers:
        offset, count = groups.layout.expert_slice(groups.rank, layer.num_experts)
        if layer.experts.num_local != layer.num_experts:
            raise RuntimeError(f"{layer.__class__.__name__} already holds a slice of its experts")
        layer.experts.keep_slice(offset, count)
        layer.dispatcher = AllToAllDispatcher(groups, dropless=layer.cfg.capacity_factor is None)
        for p in layer.experts.parameters():
            mark_expert_param(p, groups.name)
    return layers


def mark_expert_param(p: torch.nn.Parameter, group_name: str) -> None:
    """DeepSpeed's expert-parameter convention (``deepspeed.moe.utils.is_moe_param``)."""
    p.allreduce = False  # type: ignore[attr-defined]
    p.group_name = group_name  # type: ignore[attr-defined]


def is_expert_param(p: torch.Tensor) -> bool:
    """True for a parameter :func:`mark_expert_param` marked (this rank's expert slice)."""
    return getattr(p, "allreduce", True) is False


def expert_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The expert-parallel parameters of ``model`` by name (empty without EP)."""
    return {n: p for n, p in model.named_parameters() if is_expert_param(p)}


def expert_bank_params(model: nn.Module) -> dict[str, tuple[nn.Parameter, int]]:
    """Every expert-bank weight by name, with the global index of its first expert.

    Dim 0 of each is the experts this rank holds (all of them without expert
    parallelism): row ``i`` is global expert ``offset + i``. The same names at any
    ``ep_size``, which is what lets a checkpoint address experts by global index.
    """
    out: dict[str, tuple[nn.Parameter, int]] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertBank):
            for name, p in module.named_parameters(recurse=False):
                out[f"{prefix}.{name}" if prefix else name] = (p, module.expert_offset)
    return out


def split_expert_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move expert params out of each group into ``{'moe': True, 'name': group_name}`` groups.

    Every other key of the source group (lr, weight_decay, ...) is copied; dense groups
    get a ``'name'`` if they lack one. Empty groups are dropped. The result is what
    DeepSpeed's ZeRO-1/2 optimizer needs to partition experts over their
    expert-data-parallel group (cf. ``split_params_into_different_moe_groups_for_optimizer``).
    """
    out: list[dict[str, Any]] = []
    expert_groups: list[dict[str, Any]] = []
    for i, group in enumerate(param_groups):
        base = {k: v for k, v in group.items() if k != "params"}
        base.setdefault("name", f"dense_{i}")
        dense: list[Any] = []
        experts_by_name: dict[str, list[Any]] = {}
        for p in group["params"]:
            if is_expert_param(p):
                experts_by_name.setdefault(p.group_name, []).append(p)
            else:
                dense.append(p)
        if dense:
            out.append({**base, "params": dense})
        for name, params in experts_by_name.items():
            expert_groups.append({**base, "params": params, "moe": True, "name": name})
    return out + expert_groups


def register_deepspeed_groups(groups: ParallelGroups) -> None:
    """Make ``deepspeed.utils.groups`` return our EP / EDP groups for ``groups.name``."""
    from deepspeed.utils import groups as ds_groups

    tables = {
        "_EXPERT_PARALLEL_GROUP": groups.ep_group,
        "_EXPERT_PARALLEL_GROUP_RANKS": groups.layout.ep_ranks(groups.rank),
        "_EXPERT_DATA_PARALLEL_GROUP": groups.edp_group,
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS": groups.layout.edp_ranks(groups.rank),
    }
    for attr, value in tables.items():
        table = getattr(ds_groups, attr, None)
        if not isinstance(table, dict):
            raise RuntimeError(f"deepspeed.utils.groups.{attr} is not a dict in this DeepSpeed")
        table[groups.name] = value


def _marker_class(zero3: bool) -> type:
    """A parameter-free module of the class DeepSpeed's engine looks for.

    ZeRO-1/2: ``deepspeed.moe.layer.MoE`` (the engine then splits expert groups and
    reduces them over the expert-data-parallel group). ZeRO-3: the engine refuses native
    MoE (``_validate_zero3_moe_compatibility`` in deepspeed/runtime/engine.py) but
    accepts ``AutoEPMoELayer``, whose expert params are partitioned over the
    expert-data-parallel group (``ds_zero_placement_family = "autoep_expert"``).
    """
    if zero3:
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer as base
    else:
        from deepspeed.moe.layer import MoE as base

    class DeepSpeedMoEMarker(base):
        """Never called; ``set_deepspeed_parallelism`` registers turnout's groups."""

        def __init__(self, groups: ParallelGroups, num_experts: int) -> None:
            nn.Module.__init__(self)
            self._turnout_groups = groups
            self.ep_size = groups.ep_size
            self.expert_group_name = groups.name
            self.ep_group_name = groups.name
            self.num_experts = num_experts
            # Zero under ZeRO-1/2: DeepSpeed then neither saves nor loads per-expert files
            # for this marker; turnout.trainer.checkpointing.collective saves the expert
            # slices itself.
            self.num_local_experts = num_experts // groups.ep_size if zero3 else 0
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, *args: Any, **kwargs: Any) -> None:
            register_deepspeed_groups(self._turnout_groups)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("DeepSpeedMoEMarker is a marker; it is never called")

    return DeepSpeedMoEMarker


def prepare_for_deepspeed(model: nn.Module, groups: ParallelGroups, zero_stage: int = 2) -> None:
    """Attach the MoE marker and register our groups (call before ``deepspeed.initialize``).

    For ZeRO-3 the expert params are also tagged so that ZeRO-3 partitions them over the
    expert-data-parallel group only (and averages their gradients by the global size).
    """
    layers = moe_layers(model)
    if groups.ep_size == 1 or not layers:
        return
    for layer in layers:
        if not isinstance(layer.dispatcher, AllToAllDispatcher):
            raise RuntimeError("call install_expert_parallel(model, groups) first")
    register_deepspeed_groups(groups)
    if zero_stage == 3:
        from deepspeed.runtime.zero import register_external_parameter

        for layer in layers:
            for p in layer.experts.parameters():
                p.ds_zero_placement_family = "autoep_expert"  # type: ignore[attr-defined]
                p.ds_zero_partition_group_name = groups.name  # type: ignore[attr-defined]
                # Gathered whenever the MoE layer runs, not only around the bank's
                # forward (which is where the dispatchers read them).
                register_external_parameter(layer, p)
    if not hasattr(model, MARKER_NAME):
        marker = _marker_class(zero_stage == 3)(groups, layers[0].num_experts)
        model.add_module(MARKER_NAME, marker)
