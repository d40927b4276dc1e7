"""Load a turnout checkpoint into a plain ``TransformerLM`` in one process, for inference.

``load_for_inference(path, device)`` takes a run folder (its ``latest`` step is used) or a
step folder and needs no config, no process group and no DeepSpeed engine: it reads

- ``config.yaml``, the run's resolved config, which :func:`turnout.trainer.checkpoint.save`
  writes into every step folder; the model is rebuilt from its ``model`` section;
- ``mp_rank_00_model_states.pt`` (DeepSpeed's model-state file, rank 0), key ``module``:
  the module's state dict. Under ZeRO 0, 1 and 2 it holds every non-expert weight whole,
  in the dtype the training forward ran in (fp32, or bf16 under ``train.precision`` bf16).
  These are the weights the trained model computed with, so we load them rather than the
  fp32 master copy in the optimizer shards (which under bf16 differs from them by the
  last rounding), and cast them to ``dtype`` (fp32 by default; bf16 weights cast to fp32
  exactly). Keys of the DeepSpeed MoE marker module (parameter-free) are dropped.
- with ``parallel.ep_size`` > 1, the expert slices ``experts_ep<j>.pt`` (ep rank j holds
  experts ``j*E/ep .. (j+1)*E/ep - 1``), concatenated along the expert dimension in ep
  rank order. They replace whatever the model-state file holds for those weights (ZeRO 0
  saves rank 0's slice there, ZeRO 1/2 leave experts out).
- ZeRO-3 (only allowed without expert parallelism): the weights are partitioned over the
  optimizer shards, so the fp32 master weights are gathered offline with DeepSpeed's
  ``zero_to_fp32`` reader.

Anything else (a missing file, weights of another shape or name) is one
:class:`CheckpointError` (or :class:`ConfigError` for a path that is no checkpoint)
naming the path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from turnout.config import TurnoutConfig
from turnout.config.load import load_config
from turnout.errors import CheckpointError, ConfigError
from turnout.models.lm import TransformerLM
from turnout.parallel.expert_parallel import MARKER_NAME
from turnout.trainer.checkpoint import CONFIG_FILE, expert_slice_file, resolve_resume

MODEL_STATES = "mp_rank_00_model_states.pt"
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


def _torch_load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing", KEY)
    try:
        # DeepSpeed's model-state file pickles its config and counters besides tensors.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}", KEY) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a dict", KEY)
    return state


def _module_state(folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The module state dict (marker keys dropped) and the step it was saved at."""
    path = folder / MODEL_STATES
    saved = _torch_load(path)
    module = saved.get("module")
    if not isinstance(module, dict):
        raise CheckpointError(f"{path} holds no module state dict", KEY)
    state = {k: v for k, v in module.items() if not k.startswith(f"{MARKER_NAME}.")}
    return state, int(saved.get("step", _tag_step(folder)))


def _tag_step(folder: Path) -> int:
    """The step a ``step<N>`` folder name says (-1 for another name)."""
    match = re.fullmatch(r"step(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def _zero3_state(folder: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises assorted errors
        raise CheckpointError(f"cannot gather the ZeRO-3 shards of {folder}: {e}", KEY) from None
    return {k: v for k, v in state.items() if not k.startswith(f"{MARKER_NAME}.")}


def _expert_state(folder: Path, ep_size: int) -> dict[str, torch.Tensor]:
    """The full expert weights: every ep rank's slice, concatenated by global expert index."""
    files = [expert_slice_file(folder, j) for j in range(ep_size)]
    slices = [_torch_load(f) for f in files]
    names = set(slices[0])
    for f, part in zip(files[1:], slices[1:], strict=True):
        if set(part) != names:
            raise CheckpointError(
                f"{f} holds other expert weights than {files[0].name}",
                KEY,
            )
    return {n: torch.cat([part[n] for part in slices], dim=0) for n in sorted(names)}


def consolidated_state(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], TurnoutConfig, int]:
    """The whole model's state dict of a checkpoint (every expert, in the saved dtype),
    the config it was trained with, and its step: whatever layout wrote it."""
    folder = step_folder(path)
    cfg = checkpoint_config(folder)
    ep_size, stage = cfg.parallel.ep_size, cfg.parallel.zero_stage
    if stage == 3:
        return _zero3_state(folder), cfg, _tag_step(folder)
    state, step = _module_state(folder)
    if ep_size > 1 and cfg.model.uses_moe():
        state.update(_expert_state(folder, ep_size))
    return state, cfg, step


def load_for_inference(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[TransformerLM, TurnoutConfig, CheckpointInfo]:
    """Rebuild the trained model from a checkpoint, on ``device`` in ``dtype``, in eval mode."""
    folder = step_folder(path)
    state, cfg, step = consolidated_state(folder)
    ep_size, stage = cfg.parallel.ep_size, cfg.parallel.zero_stage
    saved_dtype = next((v.dtype for v in state.values() if v.is_floating_point()), dtype)
    model = TransformerLM(cfg.model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, "
            f"the config builds {tuple(expected[wrong[0]].shape)}"
        )
        raise CheckpointError(f"{folder} does not match its {CONFIG_FILE}: {detail}", KEY)
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype).eval()
    num_params = sum(p.numel() for p in model.parameters())
    return model, cfg, CheckpointInfo(folder, step, stage, ep_size, saved_dtype, num_params)
