# engine: ready
"""DeepSpeed engine construction: ZeRO stage, AdamW param groups, schedule, precision.

``build_engine(model, cfg, groups)`` wraps a ``TransformerLM`` (already on the right
device is not required; DeepSpeed moves it) into a DeepSpeed engine with
- a client ``torch.optim.AdamW`` whose param groups come from ONE function,
  :func:`optimizer_param_groups` (decay / no-decay), with expert parameters moved into
  ``moe: True`` groups when ``groups.ep_size > 1``;
- under expert parallelism, the model must already be in its expert-parallel form
  (``turnout.parallel.expert_parallel.install_expert_parallel(model, groups)``, done by
  the caller); here DeepSpeed is only told about it (``prepare_for_deepspeed``);
- the warmup + cosine LambdaLR of ``turnout.trainer.schedule`` (stepped by the engine
  at every optimizer step, saved and restored with its checkpoints);
- ZeRO stage ``cfg.parallel.zero_stage``, gradient clipping, gradient accumulation;
- bf16 when ``train.precision`` is 'bf16', or 'auto' on a CUDA device with bf16;
  fp32 otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from turnout.config import TurnoutConfig
from turnout.config.choices import Precision
from turnout.parallel.expert_parallel import prepare_for_deepspeed, split_expert_param_groups
from turnout.parallel.groups import ParallelGroups
from turnout.trainer.schedule import build_scheduler

#: Parameters of these module types never get weight decay (besides any 1-D tensor).
_NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding,)
#: Parameters whose name ends so are embedding tables held as bare parameters: no decay.
_NO_DECAY_NAMES = ("hyper_emb_RC",)


def use_bf16(precision: str) -> bool:
    """Resolve train.precision: 'auto' means bf16 on a CUDA device that supports it."""
    if precision == Precision.BF16:
        return True
    if precision == Precision.AUTO:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW param groups: 'decay' (matrices) and 'no_decay' (norms, biases, embeddings).

    Every trainable parameter appears exactly once (tied weights are deduplicated).
    The groups carry a ``name`` key; empty groups are left out.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NO_DECAY_MODULES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():  # deduplicates tied parameters
        if not p.requires_grad:
            continue
        bare_table = name.endswith(_NO_DECAY_NAMES)
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids or bare_table else decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def deepspeed_config(cfg: TurnoutConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for a TurnoutConfig (optimizer and scheduler are ours)."""
    t = cfg.train
    bf16 = use_bf16(t.precision)
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage in (1, 2):
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def quiet_deepspeed() -> None:
    """DeepSpeed logs every engine detail at INFO; keep warnings only.

    On CPU, DeepSpeed's communication backend JIT-builds a shared-memory all-reduce
    op (``deepspeed_shm_comm``) that only its inference all-reduce uses; we reduce
    through torch.distributed (gloo), and the build costs ~60 s per fresh cache (and
    was seen rebuilding itself across processes). Mark it unavailable before the
    engine creates its backend.
    """
    import deepspeed.ops
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(
    model: nn.Module, cfg: TurnoutConfig, groups: ParallelGroups
) -> tuple[Any, torch.optim.lr_scheduler.LRScheduler]:
    """Wrap ``model`` in a DeepSpeed engine; return ``(engine, lr_scheduler)``.

    The process group and ``groups`` must already exist (``init_distributed``,
    ``build_groups``), and expert parallelism be installed in ``model`` when
    ``groups.ep_size > 1``.
    """
    import deepspeed

    quiet_deepspeed()
    t = cfg.train
    param_groups = optimizer_param_groups(model, t.weight_decay)
    if groups.ep_size > 1:
        prepare_for_deepspeed(model, groups, cfg.parallel.zero_stage)
        param_groups = split_expert_param_groups(param_groups)
    optimizer = torch.optim.AdamW(
        param_groups,
        lr=t.lr,
        betas=(float(t.betas[0]), float(t.betas[1])),
        eps=1e-8,
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: build_scheduler(opt, t.lr, t.min_lr, t.warmup_steps, t.steps),
        config=deepspeed_config(cfg, groups.world),
        dist_init_required=False,
    )
    return engine, scheduler
