"""The export folder: one safetensors file of the whole model plus the config it was built with.

``turnout export CHECKPOINT OUT/`` writes (``turnout.trainer.weights.export``)

- ``config.yaml``: the run's resolved :class:`TurnoutConfig` (its ``model`` section builds
  the model);
- ``model.safetensors``: the consolidated state dict, every expert, in the dtype the
  training forward ran in. A tied output projection (``model.tie_embeddings``) is stored
  once, as ``embed.weight``; the file's metadata carries ``turnout.step``;
- ``tokenizer.json`` when the checkpoint had one next to its config.

:func:`from_pretrained` (also ``TransformerLM.from_pretrained``) rebuilds the model from
such a folder in one process: no process group, no DeepSpeed, no checkpoint internals.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from turnout.config import TurnoutConfig
from turnout.config.load import load_config
from turnout.errors import CheckpointError, ConfigError
from turnout.files import CONFIG_FILE
from turnout.models.lm import TransformerLM

WEIGHTS_FILE = "model.safetensors"
#: safetensors metadata key holding the optimizer step the weights were saved at.
STEP_KEY = "turnout.step"
#: State-dict key left out of the file when the output projection is tied to the embedding.
TIED_KEY = "head.weight"


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a turnout export folder (weights and config.yaml)."""
    p = Path(path).expanduser()
    return (p / WEIGHTS_FILE).is_file() and (p / CONFIG_FILE).is_file()


def export_config(path: str | os.PathLike, key: str = "path") -> TurnoutConfig:
    """The config of an export folder; ConfigError naming ``key`` if it has none."""
    folder = Path(path).expanduser()
    if not is_export(folder):
        raise ConfigError(key, f"{folder} is not a turnout export ({WEIGHTS_FILE} + {CONFIG_FILE})")
    try:
        return load_config(str(folder / CONFIG_FILE))
    except ConfigError as e:
        raise ConfigError(key, f"{folder / CONFIG_FILE}: {e}") from None


def read_export(
    path: str | os.PathLike, key: str = "path"
) -> tuple[dict[str, torch.Tensor], TurnoutConfig, int]:
    """(state dict with tied weights restored, config, step) of an export folder."""
    from safetensors import safe_open

    folder = Path(path).expanduser()
    cfg = export_config(folder, key)
    weights = folder / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
            step = int((f.metadata() or {}).get(STEP_KEY, -1))
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise CheckpointError(f"cannot read {weights}: {type(e).__name__}: {e}", key) from None
    return restore_tied(state, cfg), cfg, step


def restore_tied(state: dict[str, torch.Tensor], cfg: TurnoutConfig) -> dict[str, torch.Tensor]:
    """``state`` with the tied output projection (stored once, as ``embed.weight``) put
    back under :data:`TIED_KEY` when ``model.tie_embeddings``; changed in place."""
    if cfg.model.tie_embeddings and TIED_KEY not in state and "embed.weight" in state:
        state[TIED_KEY] = state["embed.weight"]
    return state


def check_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, key: str
) -> None:
    """CheckpointError naming ``key`` unless ``state`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing:
        detail = f"missing {missing[:3]}"
    elif unexpected:
        detail = f"unexpected {unexpected[:3]}"
    elif wrong:
        detail = (
            f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, "
            f"the config builds {tuple(expected[wrong[0]].shape)}"
        )
    else:
        return
    raise CheckpointError(f"{where} does not match its {CONFIG_FILE}: {detail}", key)


def from_pretrained(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TransformerLM:
    """The model of an export folder, on ``device`` in ``dtype``, in eval mode."""
    state, cfg, _ = read_export(path)
    model = TransformerLM(cfg.model)
    check_state(model, state, str(Path(path) / WEIGHTS_FILE), "path")
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()
