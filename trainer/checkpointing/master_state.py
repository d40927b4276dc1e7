"""Read and write one parameter's fp32 master weight and AdamW moments, whatever the ZeRO stage.

This is the layout-free view the checkpoint format
(:mod:`turnout.trainer.checkpointing.collective`) is built on: for a parameter of the
engine's module, its whole fp32 master tensor, its ``exp_avg`` and ``exp_avg_sq`` (the
shape of the parameter as this rank's module holds it: under expert parallelism, this
rank's experts) and its optimizer step count.

How each optimizer keeps them, and how we reach them:

- ZeRO 0 in fp32: DeepSpeed steps our ``torch.optim.AdamW`` directly; the parameter is its
  own master and ``optimizer.state[param]`` holds the moments. ZeRO 0 in bf16 (with our
  client optimizer DeepSpeed picks its unfused optimizer): one fp32 copy per parameter,
  ``fp32_groups`` parallel to ``fp16_groups``, is the master AdamW steps.
- ZeRO 1/2 (and DeepSpeed's bf16 optimizer, should it be picked): the fp32 masters and moments
  are flat partitions over the (expert-)data-parallel group; DeepSpeed's public per-parameter
  API (``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` and
  their ``safe_set_*`` twins) gathers a whole parameter (an all-reduce over the parameter's
  own group) and writes this rank's fragment of it (no communication).
- ZeRO 3: the same API, backed by the stage-3 optimizer (an all-gather over the group the
  parameter is partitioned over: every rank for dense weights, the expert-data-parallel
  group for expert weights).

AdamW creates its state lazily at the first step, and DeepSpeed links its per-parameter
views of it only then; :func:`ensure_optimizer_state` creates that state (zero moments, the
given step) up front, which is what the first step would have created, so moments can be
written into a freshly built engine and read from one that never stepped. After writing
masters, :func:`refresh_model_weights` copies them into the weights the forward uses.

A frozen parameter (``train.trainable``, ``requires_grad=False``) is in no optimizer: its
weight is its master and its moments read as zeros (:func:`_frozen`); writing one writes
the weight (this rank's partition under ZeRO-3).

Getters are collective over each parameter's group: every rank calls them for the same
parameters in the same order (``named_parameters`` order, the same on every rank).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MOMENTS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-parameter state tensors."""


def _flat_masters(optimizer: Any) -> list[torch.Tensor] | None:
    """The flat fp32 partitions a DeepSpeed optimizer steps (None: it steps the params)."""
    for attr in (
        "single_partition_of_fp32_groups",  # ZeRO 1/2
        "fp32_partitioned_groups_flat",  # ZeRO 3
        "fp32_groups_flat_partition",  # bf16 optimizer (ZeRO 0)
    ):
        flats = getattr(optimizer, attr, None)
        if flats is not None:
            return list(flats)
    return None


def _base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state (DeepSpeed wrappers keep it as ``.optimizer``)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _is_deepspeed_managed(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _fresh_state(like: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    state = {k: torch.zeros_like(like, dtype=torch.float32) for k in MOMENTS}
    return {"step": torch.tensor(float(step)), **state}


def ensure_optimizer_state(engine: Any, step: int = 0) -> None:
    """Create AdamW's state where the first step has not yet (zero moments, ``step``)."""
    optimizer = engine.optimizer
    base = _base_optimizer(optimizer)
    flats = _flat_masters(optimizer)
    targets = flats if flats is not None else [p for g in base.param_groups for p in g["params"]]
    for t in targets:
        if not base.state.get(t):
            base.state[t] = _fresh_state(t, step)
    _link_fragments(optimizer, base)


def _link_fragments(optimizer: Any, base: torch.optim.Optimizer) -> None:
    """Point every parameter's DeepSpeed fragment at its slice of the flat AdamW state.

    DeepSpeed does this once, after its first step, and (seen in 0.19.8 with several
    param groups) can leave some fragments without moments; redoing it is cheap and
    idempotent (views of the same state tensors, which AdamW updates in place).
    """
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    for lp_attr, hp_attr in (
        ("bit16_groups", "single_partition_of_fp32_groups"),  # ZeRO 1/2
        ("bf16_groups", "fp32_groups_flat_partition"),  # bf16 optimizer
    ):
        lp_groups, hp_groups = getattr(optimizer, lp_attr, None), getattr(optimizer, hp_attr, None)
        if lp_groups is None or hp_groups is None:
            continue
        for lp, hp in zip(lp_groups, hp_groups, strict=True):
            lazy_init_hp_params_optimizer_state(lp, hp, base.state)
        optimizer._hp_optimizer_states_linked = True
        return


def set_optimizer_step(engine: Any, step: int) -> None:
    """Set AdamW's step count (bias correction) of every state entry to ``step``."""
    base = _base_optimizer(engine.optimizer)
    for state in base.state.values():
        if "step" in state:
            s = state["step"]
            if torch.is_tensor(s):
                s.fill_(float(step))
            else:
                state["step"] = step


def optimizer_step(engine: Any) -> int:
    """AdamW's step count (the same for every entry: every parameter steps together)."""
    base = _base_optimizer(engine.optimizer)
    steps = [int(float(s["step"])) for s in base.state.values() if "step" in s]
    return max(steps, default=0)


def _own_master(optimizer: Any, p: nn.Parameter) -> torch.Tensor:
    """The tensor AdamW steps for ``p`` when DeepSpeed keeps no flat partitions: ``p``
    itself (fp32), or its fp32 copy (ZeRO 0 in bf16: DeepSpeed's unfused optimizer keeps
    ``fp32_groups`` parallel to the model's ``fp16_groups``)."""
    lp_groups, hp_groups = (
        getattr(optimizer, "fp16_groups", None),
        getattr(optimizer, "fp32_groups", None),
    )
    if lp_groups is None or hp_groups is None:
        return p
    for lp_group, hp_group in zip(lp_groups, hp_groups, strict=True):
        for lp, hp in zip(lp_group, hp_group, strict=True):
            if lp is p:
                return hp
    raise KeyError("parameter not found in the optimizer's fp16_groups")


def param_shape(p: torch.Tensor) -> torch.Size:
    """The parameter's logical shape (ZeRO-3 leaves an empty placeholder in ``p``)."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def get_master(engine: Any, p: nn.Parameter) -> dict[str, torch.Tensor]:
    """Collective: ``{'param', 'exp_avg', 'exp_avg_sq'}`` of ``p``, whole, fp32, on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if not p.requires_grad:
        return _frozen(p)
    if _is_deepspeed_managed(p):
        out = {"param": safe_get_full_fp32_param(p)}
        out.update({k: safe_get_full_optimizer_state(p, k) for k in MOMENTS})
    else:
        master = _own_master(engine.optimizer, p)
        state = _base_optimizer(engine.optimizer).state[master]
        out = {"param": master.detach(), **{k: state[k] for k in MOMENTS}}
    shape = param_shape(p)
    return {k: v.detach().float().reshape(shape).cpu().clone() for k, v in out.items()}


def set_master(engine: Any, p: nn.Parameter, value: dict[str, torch.Tensor]) -> None:
    """Write ``p``'s fp32 master and moments (each whole, ``p``'s logical shape); local."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not p.requires_grad:
        _set_frozen(engine, p, value["param"])
        return
    if hasattr(p, "ds_id"):
        _set_zero3(engine, p, value)
        return
    if _is_deepspeed_managed(p):
        device = p.device
        safe_set_full_fp32_param(p, value["param"].to(device, torch.float32))
        for k in MOMENTS:
            safe_set_full_optimizer_state(p, value[k].to(device, torch.float32), k)
        return
    master = _own_master(engine.optimizer, p)
    state = _base_optimizer(engine.optimizer).state[master]
    with torch.no_grad():
        master.copy_(value["param"].to(master.device, master.dtype))
        for k in MOMENTS:
            state[k].copy_(value[k].to(state[k].device, state[k].dtype))


def _frozen(p: nn.Parameter) -> dict[str, torch.Tensor]:
    """A frozen parameter (``train.trainable``): no optimizer holds it, so its weight is its
    master (gathered whole under ZeRO-3) and its moments are zero."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            whole = p.detach().float().cpu().clone()
    else:
        whole = p.detach().float().cpu().clone()
    zeros = torch.zeros_like(whole)
    return {"param": whole, **{k: zeros.clone() for k in MOMENTS}}


def _set_frozen(engine: Any, p: nn.Parameter, whole: torch.Tensor) -> None:
    """Write a frozen parameter's weight (this rank's partition under ZeRO-3); local."""
    with torch.no_grad():
        if not hasattr(p, "ds_id"):
            p.copy_(whole.to(p.device, p.dtype))
            return
        import torch.distributed as dist

        group = getattr(p, "ds_process_group", None) or engine.optimizer.dp_process_group
        rank, size = dist.get_rank(group=group), dist.get_world_size(group=group)
        ds_tensor: torch.Tensor = getattr(p, "ds_tensor")  # noqa: B009 (ZeRO-3's partition)
        n = ds_tensor.numel()
        padded = torch.zeros(n * size, dtype=torch.float32)
        padded[: whole.numel()] = whole.flatten().float()
        ds_tensor.copy_(padded[rank * n : (rank + 1) * n].to(ds_tensor.device, ds_tensor.dtype))


def _set_zero3(engine: Any, p: nn.Parameter, value: dict[str, torch.Tensor]) -> None:
    """ZeRO-3: write this rank's partition (DeepSpeed's ``safe_set_full_*`` narrows the
    whole value without the partition padding and fails on small tensors)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    group = getattr(p, "ds_process_group", None) or engine.optimizer.dp_process_group
    rank, size = dist.get_rank(group=group), dist.get_world_size(group=group)
    ds_tensor: torch.Tensor = getattr(p, "ds_tensor")  # noqa: B009 (ZeRO-3's partition)
    n = ds_tensor.numel()
    device = ds_tensor.device

    def local(t: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(n * size, dtype=torch.float32)
        padded[: t.numel()] = t.flatten().float()
        return padded[rank * n : (rank + 1) * n].to(device)

    safe_set_local_fp32_param(p, local(value["param"]))
    for k in MOMENTS:
        safe_set_local_optimizer_state(p, local(value[k]), k)


def refresh_model_weights(engine: Any) -> None:
    """Collective: copy the fp32 masters into the weights the forward runs with."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO 3
        for i in range(len(optimizer.fp32_partitioned_groups_flat)):
            optimizer._reassign_or_swap_out_partitioned_parameters(i)
    elif hasattr(optimizer, "update_lp_params"):  # ZeRO 1/2, bf16 optimizer
        optimizer.update_lp_params()
    elif hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):  # unfused
        with torch.no_grad():
            for lp_group, hp_group in zip(
                optimizer.fp16_groups, optimizer.fp32_groups, strict=True
            ):
                for lp, hp in zip(lp_group, hp_group, strict=True):
                    lp.copy_(hp)
