"""``turnout export``: a checkpoint as one safetensors file plus its config (or a HF folder).

The checkpoint (or a turnout export folder, e.g. one ``turnout import`` wrote) is read with
:func:`turnout.trainer.weights.from_checkpoint.consolidated_state` (whatever
layout wrote it); the folder's layout is described in :mod:`turnout.models.pretrained`
(``--format turnout``) and :mod:`turnout.trainer.weights.hf_format` (``--format hf``). A tokenizer
file saved next to the checkpoint's ``config.yaml`` is copied along in both formats.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from turnout.config import TurnoutConfig
from turnout.config.load import to_yaml
from turnout.errors import ConfigError
from turnout.files import CONFIG_FILE, TOKENIZER_FILE
from turnout.models.pretrained import STEP_KEY, TIED_KEY, WEIGHTS_FILE, is_export, read_export
from turnout.trainer.weights.from_checkpoint import KEY, consolidated_state, step_folder
from turnout.trainer.weights.hf_format import write_hf

FORMATS = ("turnout", "hf")


@dataclass(frozen=True)
class Exported:
    folder: Path
    """Where the files were written."""
    step: int
    """The optimizer step of the checkpoint."""
    kind: str
    """'turnout', or the HF architecture ('llama' / 'mixtral')."""
    num_tensors: int
    dtype: torch.dtype


def check_out(out: Path) -> None:
    """ConfigError naming OUT unless it is a new or empty folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError("OUT", f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError("OUT", f"{out} is not empty; export writes into a new or empty folder")


def turnout_tensors(
    state: dict[str, torch.Tensor], tied: bool, copy: bool = True
) -> dict[str, torch.Tensor]:
    """The tensors ``model.safetensors`` holds: the tied head left out, each stored alone
    (``copy``: cloned, for tensors that may share storage, as a module's state dict's do;
    without it a tensor is only made contiguous)."""
    return {
        k: (v.detach().contiguous().clone() if copy else v.detach().contiguous())
        for k, v in state.items()
        if not (tied and k == TIED_KEY)
    }


def write_turnout(
    out: Path, state: dict[str, torch.Tensor], cfg: TurnoutConfig, step: int, copy: bool = True
) -> int:
    """Write ``model.safetensors`` and ``config.yaml`` into ``out``; return the tensor count.
    ``copy=False`` for a state whose tensors own their storage (no second copy in memory)."""
    from safetensors.torch import save_file

    tensors = turnout_tensors(state, cfg.model.tie_embeddings, copy)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", STEP_KEY: str(step)})
    (out / CONFIG_FILE).write_text(to_yaml(cfg))
    return len(tensors)


def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "turnout",
    allow_dropless: bool = False,
) -> Exported:
    """Write ``checkpoint``'s whole model into the folder ``out`` (see the module docstring)."""
    if fmt not in FORMATS:
        raise ConfigError("--format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out_dir = Path(out).expanduser()
    check_out(out_dir)
    if is_export(checkpoint):  # an export (e.g. of `turnout import`) re-exported
        folder = Path(checkpoint).expanduser()
        state, cfg, step = read_export(folder, KEY)
    else:
        folder = step_folder(checkpoint)
        state, cfg, step = consolidated_state(folder)
    if not state:
        raise ConfigError(KEY, f"{folder} holds no weights")
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    if fmt == "hf" and cfg.data.structure:
        raise ConfigError(
            "--format", f"{folder} is a function-name model: it has no Hugging Face form"
        )
    if fmt == "hf":
        kind, count = write_hf(out_dir, cfg, state, allow_dropless)
    else:
        kind, count = "turnout", write_turnout(out_dir, state, cfg, step)
    tokenizer = folder / TOKENIZER_FILE
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, out_dir / TOKENIZER_FILE)
    return Exported(out_dir, step, kind, count, dtype)
