"""Can this run resume ``train.resume`` at its own layout, and with which gradient accumulation?

Checkpoints (:mod:`turnout.trainer.checkpointing.collective`) carry no layout, so world size,
``parallel.ep_size`` and ZeRO stage may all change on resume. Two things may not:

- the model's parameters: the new ``model`` section must build parameters of the same
  names and shapes (a refusal names the first ``model.*`` key that differs);
- the global batch (sequences per optimizer step), so that the resumed run trains on the
  same sequences, and the next losses match the uninterrupted run. The micro batch and
  world size are the user's; ``train.grad_accum`` is set to keep
  ``micro_batch_size x grad_accum x world`` at the checkpoint's value. When no whole
  number does it the resume is refused, naming ``train.micro_batch_size``.

:func:`resume_config` runs on the launcher before any worker starts (the preflight) and
again in every worker (``train``), where its adjusted config is the one trained with.
:func:`verify_checkpoint` (the manifest check, which reads every file) runs only in the
preflight.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from turnout.config import TurnoutConfig
from turnout.config.load import flatten, load_config
from turnout.errors import CheckpointError, ConfigError
from turnout.files import CONFIG_FILE
from turnout.trainer.checkpointing import manifest
from turnout.trainer.checkpointing.files import read_meta, resolve_resume
from turnout.trainer.structure.model import build_model

log = logging.getLogger("turnout.trainer")
KEY = "train.resume"


def _shapes(cfg: TurnoutConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _model_key_that_differs(new: TurnoutConfig, old: TurnoutConfig) -> str:
    a, b = flatten(new), flatten(old)
    shaped = ("model.", "data.ast.")  # data.ast sets a structure model's classes, positions
    keys = [k for k in a if k.startswith(shaped) and a[k] != b.get(k)]
    return keys[0] if keys else KEY


def verify_checkpoint(path: str, key: str = KEY) -> None:
    """The checkpoint ``path`` (run or step folder) is whole: its manifest's files are all
    there with their sizes and sha256. ConfigError naming ``key`` and the first bad file."""
    load_dir, tag = resolve_resume(path)
    try:
        manifest.verify(load_dir / tag)
    except CheckpointError as e:
        raise ConfigError(key, e.message) from None


def resume_config(cfg: TurnoutConfig, world: int | None = None) -> TurnoutConfig:
    """``cfg`` with ``train.grad_accum`` set for the resumed checkpoint's global batch;
    ConfigError (one line, naming the key) for a checkpoint this run cannot continue.
    ``world`` defaults to ``launch.num_workers``. Without ``train.resume``, ``cfg`` itself."""
    if not cfg.train.resume:
        return cfg
    world = cfg.launch.num_workers if world is None else world
    load_dir, tag = resolve_resume(cfg.train.resume)
    folder = load_dir / tag
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(KEY, f"{folder} has no {CONFIG_FILE}; cannot check it fits this run")
    try:
        saved = load_config(str(folder / CONFIG_FILE))
    except ConfigError as e:
        raise ConfigError(KEY, f"{folder / CONFIG_FILE}: {e}") from None
    try:
        meta = read_meta(folder)
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is a bad input here
        raise ConfigError(KEY, str(e)) from None
    new_shapes, old_shapes = _shapes(cfg), _shapes(saved)
    if new_shapes != old_shapes:
        key = _model_key_that_differs(cfg, saved)
        raise ConfigError(
            key,
            f"the checkpoint {folder} was trained with another model "
            f"(its {CONFIG_FILE} differs here); a resumed run keeps the model's shapes",
        )
    global_batch = int(meta["global_batch"])
    per_micro = cfg.train.micro_batch_size * world
    if global_batch % per_micro:
        raise ConfigError(
            "train.micro_batch_size",
            f"the checkpoint's global batch of {global_batch} sequences is not a multiple of "
            f"micro_batch_size {cfg.train.micro_batch_size} x {world} workers "
            "(launch.num_workers); choose one that divides it",
        )
    grad_accum = global_batch // per_micro
    if grad_accum == cfg.train.grad_accum:
        return cfg
    log.warning(
        "resuming %s at %d worker(s): train.grad_accum %d -> %d keeps its global batch of %d",
        folder,
        world,
        cfg.train.grad_accum,
        grad_accum,
        global_batch,
    )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=grad_accum))
