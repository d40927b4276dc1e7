"""Load a turnout checkpoint into a plain model in one process, for inference: a
``TransformerLM``, or the ``StructureModel`` of a function-name run.

``load_for_inference(path, device)`` takes a run folder (its ``latest`` step is used) or a
step folder and needs no config, no process group and no DeepSpeed engine: it reads

- ``config.yaml``, the run's resolved config, which
  :func:`turnout.trainer.checkpointing.collective.save`
  writes into every step folder; the model is rebuilt from its ``model`` section;
- the layout-free weights (:func:`turnout.trainer.checkpointing.files.consolidated_master`): every
  parameter's fp32 master, expert weights concatenated by global expert index whatever
  ``parallel.ep_size`` and ZeRO stage wrote them, and the persistent buffers. The masters
  are cast to the dtype the training forward ran in (``meta.pt``: fp32, or bf16 under
  ``train.precision`` bf16), which reproduces the weights the trained model computed with
  (DeepSpeed copies the master into the forward's weights by the same cast), and then to
  ``dtype`` (fp32 by default; bf16 casts to fp32 exactly).

Anything else (a missing file, weights of another shape or name) is one
:class:`CheckpointError` (or :class:`ConfigError` for a path that is no checkpoint)
naming the path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from turnout.config import TurnoutConfig
from turnout.config.load import load_config
from turnout.errors import CheckpointError, ConfigError
from turnout.files import CONFIG_FILE, tag_step
from turnout.models.pretrained import check_state
from turnout.trainer.checkpointing.files import consolidated_master, resolve_resume
from turnout.trainer.structure.model import build_model

KEY = "checkpoint"
"""What our errors name: the CHECKPOINT argument."""


@dataclass(frozen=True)
class CheckpointInfo:
    folder: Path
    """The step folder the weights came from."""
    step: int
    zero_stage: int
    ep_size: int
    saved_dtype: torch.dtype
    """The dtype the weights were saved in (the training forward's)."""
    num_params: int
    """Parameters of the loaded model (tied weights once)."""


def step_folder(path: str | os.PathLike) -> Path:
    """The step folder a run folder's ``latest`` names, or ``path`` itself if it is one."""
    try:
        load_dir, tag = resolve_resume(path)
    except ConfigError as e:
        raise ConfigError(KEY, e.message) from None
    return load_dir / tag


def checkpoint_config(folder: Path) -> TurnoutConfig:
    """The resolved config a step folder was trained with (``config.yaml``)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            KEY, f"{folder} has no {CONFIG_FILE} (saved by an older turnout?); cannot rebuild it"
        )
    try:
        return load_config(str(path))
    except ConfigError as e:
        raise ConfigError(KEY, f"{path}: {e}") from None


def _saved_step(meta: dict, folder: Path) -> int:
    """The step in ``meta.pt``, else the one the ``step<N>`` folder name says (-1: neither)."""
    named = tag_step(folder.name)
    return int(meta.get("step", -1 if named is None else named))


def _module_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole module state dict (parameters in the forward's dtype, buffers) and meta."""
    try:
        params, buffers, meta = consolidated_master(folder)
    except CheckpointError as e:
        raise CheckpointError(e.message, KEY) from None
    dtype = getattr(torch, str(meta.get("weight_dtype", "float32")), torch.float32)
    state = {n: v["param"].to(dtype) for n, v in params.items()}
    state.update(buffers)
    return state, meta


def consolidated_state(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], TurnoutConfig, int]:
    """The whole model's state dict of a checkpoint (every expert, in the saved dtype),
    the config it was trained with, and its step: whatever layout wrote it."""
    folder = step_folder(path)
    cfg = checkpoint_config(folder)
    state, meta = _module_state(folder)
    return state, cfg, _saved_step(meta, folder)


def load_for_inference(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Any, TurnoutConfig, CheckpointInfo]:
    """Rebuild the trained model from a checkpoint, on ``device`` in ``dtype``, in eval mode."""
    folder = step_folder(path)
    state, cfg, step = consolidated_state(folder)
    ep_size, stage = cfg.parallel.ep_size, cfg.parallel.zero_stage
    saved_dtype = next((v.dtype for v in state.values() if v.is_floating_point()), dtype)
    model = build_model(cfg)  # a language model, or a function-name model
    check_state(model, state, str(folder), KEY)
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype).eval()
    num_params = sum(p.numel() for p in model.parameters())
    return model, cfg, CheckpointInfo(folder, step, stage, ep_size, saved_dtype, num_params)
