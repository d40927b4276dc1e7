"""Atomic DeepSpeed checkpoints: ``<ckpt_dir>/<run>/step<N>/`` plus a ``latest`` file.

Every rank writes its part (model states on rank 0, its ZeRO optimizer partition on
every rank) under a hidden temporary tag ``.tmp-step<N>``; after a barrier rank 0
renames the folder to ``step<N>`` and then rewrites ``latest`` atomically (temp file +
os.replace). A run killed mid-save leaves only a hidden temporary folder, never a
``step<N>`` folder or a ``latest`` pointing at a half checkpoint.

Each step folder also holds ``config.yaml``, the run's resolved config (written by rank 0
into the temporary tag, so it appears with the rest or not at all): with it a checkpoint
loads without knowing how it was trained (:mod:`turnout.trainer.export`).

Resuming accepts a run folder (its ``latest`` tag is used) or one ``step<N>`` folder.
The client state carries the next optimizer step, which is also the data position
(``BatchSampler`` windows are a pure function of the step).
Assumes ``ckpt_dir`` is one filesystem shared by all ranks (one machine, or a shared
mount on a cluster).

Expert parallelism (``groups``, the run's :class:`ParallelGroups`, passed in by the
caller): DeepSpeed's model-state file leaves out expert parameters (those marked
``allreduce=False``) and expects its own MoE layer's naming to save them, which our
expert banks do not have. So each rank that is first in its expert-data-parallel group
also writes its local expert slice as ``experts_ep<ep rank>.pt`` inside the same
temporary tag, and ``load`` puts the slice back after DeepSpeed has restored the rest
(the ZeRO-1/2 optimizer's fp32 master partitions are restored by DeepSpeed itself).
Under ZeRO-3 expert parameters are partitioned and saved with the ZeRO shards.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from turnout.config import TurnoutConfig
from turnout.config.load import to_yaml
from turnout.errors import CheckpointError, ConfigError
from turnout.parallel.dist import barrier
from turnout.parallel.expert_parallel import expert_params
from turnout.parallel.groups import ParallelGroups

LATEST = "latest"
CONFIG_FILE = "config.yaml"


def tag_for(step: int) -> str:
    return f"step{step}"


def expert_slice_file(folder: Path, ep_rank: int) -> Path:
    """The file holding expert-parallel rank ``ep_rank``'s expert slice in a step folder."""
    return folder / f"experts_ep{ep_rank}.pt"


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*model_states.pt"))


def resolve_resume(path: str | os.PathLike) -> tuple[Path, str]:
    """(load_dir, tag) for a run folder or a step folder; ConfigError('train.resume') if not."""
    p = Path(path).expanduser()
    if _is_tag_dir(p):
        return p.parent.resolve(), p.name
    latest = p / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if _is_tag_dir(p / tag):
            return p.resolve(), tag
        raise ConfigError("train.resume", f"{latest} names {tag!r}, which is not a checkpoint")
    raise ConfigError(
        "train.resume", f"{path} is neither a checkpoint run folder nor a step folder"
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(
    engine: Any,
    run_dir: Path,
    step: int,
    client_state: dict,
    groups: ParallelGroups,
    cfg: TurnoutConfig | None = None,
) -> Path:
    """Collective: write checkpoint ``step<step>`` atomically; return its folder.

    ``cfg`` (the run's resolved config) is written as ``config.yaml`` beside the weights;
    without it the checkpoint can only be resumed by a run that knows its config.
    """
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    rank = groups.rank
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(run_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    _save_expert_slice(engine, run_dir / tmp_tag, groups)
    if rank == 0 and cfg is not None:
        (run_dir / tmp_tag / CONFIG_FILE).write_text(to_yaml(cfg))
        from turnout.trainer import tokenizer_files

        tokenizer_files.save(run_dir / tmp_tag, cfg)  # tokenizer.json beside config.yaml
    barrier()
    final = run_dir / tag
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(run_dir / tmp_tag, final)
        _write_atomic(run_dir / LATEST, tag)
    barrier()
    return final


def load(engine: Any, path: str | os.PathLike, groups: ParallelGroups) -> dict:
    """Collective: restore model, optimizer and lr scheduler; return the client state."""
    load_dir, tag = resolve_resume(path)
    sharded_experts = _saves_expert_slices(engine, groups)
    loaded, client_state = engine.load_checkpoint(
        str(load_dir),
        tag=tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        # The model-state file lacks the expert slices; _load_expert_slice adds them.
        load_module_strict=not sharded_experts,
    )
    if loaded is None:
        raise CheckpointError(f"could not load checkpoint {load_dir / tag}")
    if sharded_experts:
        _load_expert_slice(engine, load_dir / tag, groups)
    return client_state or {}


def _saves_expert_slices(engine: Any, groups: ParallelGroups) -> bool:
    """Experts are split over ranks and ZeRO-3 does not partition (and save) them."""
    if groups.ep_size == 1 or engine.zero_optimization_stage() == 3:
        return False
    return bool(expert_params(engine.module))


def _save_expert_slice(engine: Any, folder: Path, groups: ParallelGroups) -> None:
    if not _saves_expert_slices(engine, groups) or groups.layout.edp_rank(groups.rank) != 0:
        return
    state = {n: p.detach().cpu().clone() for n, p in expert_params(engine.module).items()}
    torch.save(state, expert_slice_file(folder, groups.ep_rank))


def _load_expert_slice(engine: Any, folder: Path, groups: ParallelGroups) -> None:
    path = expert_slice_file(folder, groups.ep_rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (saved with another ep_size?)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = expert_params(engine.module)
    if set(state) != set(params):
        raise CheckpointError(f"{path} holds other expert parameters than this model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))
