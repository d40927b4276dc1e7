"""Save and load a live engine (collective): atomic, layout-free checkpoints.

A run's checkpoints are ``<ckpt_dir>/<run>/step<N>/`` plus a ``latest`` file.

A checkpoint written at one layout resumes at another: a different world size
(``launch.num_workers``), ``parallel.ep_size`` or ZeRO stage. So nothing on disk depends on
the layout that wrote it. Each step folder holds

- ``dense.pt`` (rank 0): every parameter that is not an expert-bank weight, by name, as
  ``{'param', 'exp_avg', 'exp_avg_sq'}``: the whole fp32 master and its AdamW moments; and
  ``buffers``, every persistent module buffer (e.g. the MoE ``expert_bias``);
- ``experts_ep<j>.pt`` (one per expert slice that was held when saving: the first rank of
  each expert-data-parallel group writes its own): the expert-bank weights the same way,
  dim 0 being experts, with ``offset`` giving the GLOBAL index of row 0. Loading addresses
  rows by global expert index, so any ``ep_size`` that divides the experts reads them;
- ``meta.pt`` (rank 0): the format tag, the step, the client state (data position),
  AdamW's step count, the learning-rate schedule's position, DeepSpeed's step counters,
  the layout and global batch that wrote it, and the dtype the forward ran in;
- ``config.yaml``, the run's resolved config, so a checkpoint loads without knowing how it
  was trained (:mod:`turnout.trainer.weights.from_checkpoint`, and the resume preflight).

Why our own format rather than DeepSpeed's: DeepSpeed's own files are per-rank ZeRO
partitions that only load at the same data-parallel world size, and its model-state file
leaves out expert weights that are not its own MoE layer's (ours are not). DeepSpeed's
universal checkpoint reshards dense ZeRO state but needs an offline conversion pass, knows
nothing of our expert banks, and does not cover ZeRO-3 with expert parallelism; a
torch.distributed.checkpoint plan would have to be taught the same expert-index mapping.
The per-parameter view :mod:`turnout.trainer.checkpointing.master_state` gives us
(DeepSpeed's public ``safe_get/set_full_*`` API) is the same at every stage, so saving
is "each parameter, whole" and loading is "each local parameter, from the whole one" -
for experts, the rows of this rank's global expert indices. The cost is that the dense
state is gathered to one rank when saving and read whole by every rank when loading
(expert files are memory-mapped and only the needed rows are read): fine for the models
turnout trains.

Atomicity: every file goes into a hidden temporary tag ``.tmp-step<N>``; once all are
written rank 0 adds ``manifest.json`` (every file's size and sha256,
:mod:`turnout.trainer.checkpointing.manifest`), renames the folder to ``step<N>`` and then rewrites
``latest`` atomically (temp file + os.replace). A run killed mid-save leaves only a hidden
temporary folder; a step folder damaged later is named by the manifest check on resume.
A write a retry cannot fix (a full or read-only disk,
:mod:`turnout.trainer.checkpointing.disk`) is collective: the failures travel in the
gather of the manifest entries and the closing broadcast, every rank raises the same
:class:`~turnout.errors.DiskError`, and rank 0 removes the temporary folder; ``latest``
and the previous checkpoint are untouched. Pruning old checkpoints is
:mod:`turnout.trainer.checkpointing.retention`, after the save.

Resuming accepts a run folder (its ``latest`` tag is used) or one ``step<N>`` folder. The
client state carries the next optimizer step, which is also the data position
(``BatchSampler`` windows are a pure function of the step and the global sample slot).
Whether a layout can resume a checkpoint at all, and the gradient accumulation that keeps
its global batch, is :mod:`turnout.trainer.resume.layout` (run on the launcher too).
Assumes ``ckpt_dir`` is one filesystem shared by all ranks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from turnout.config import TurnoutConfig
from turnout.config.load import to_yaml
from turnout.errors import CheckpointError, DiskError
from turnout.files import CONFIG_FILE, step_tag, write_atomic
from turnout.parallel.dist import all_gather_object, broadcast_object
from turnout.parallel.expert_parallel import expert_bank_params
from turnout.parallel.groups import ParallelGroups
from turnout.trainer.checkpointing import disk, manifest
from turnout.trainer.checkpointing.files import (
    DENSE_FILE,
    FORMAT,
    LATEST,
    META_FILE,
    expert_rows,
    expert_slice_file,
    latest_tag,
    load_file,
    persistent_buffers,
    read_expert_files,
    read_meta,
    resolve_resume,
)
from turnout.trainer.checkpointing.master_state import (
    ensure_optimizer_state,
    get_master,
    optimizer_step,
    param_shape,
    refresh_model_weights,
    set_master,
    set_optimizer_step,
)


def _dense_params(model: nn.Module) -> dict[str, nn.Parameter]:
    expert_ids = {id(p) for p, _ in expert_bank_params(model).values()}
    return {n: p for n, p in model.named_parameters() if id(p) not in expert_ids}


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Second names of tied parameters (``head.weight`` -> ``embed.weight``): a state dict
    has both, ``named_parameters`` (and so the checkpoint) the first only."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def save(
    engine: Any,
    run_dir: Path,
    step: int,
    client_state: dict,
    groups: ParallelGroups,
    cfg: TurnoutConfig | None = None,
    tokenizer_file: Path | None = None,
) -> Path:
    """Collective: write checkpoint ``step<step>`` atomically; return its folder.

    ``cfg`` (the run's resolved config) is written as ``config.yaml`` beside the weights;
    without it the checkpoint can only be resumed by a run that knows its config. With it,
    the run's ``tokenizer.json`` goes beside it too: ``tokenizer_file`` (the token cache's,
    ``TokenData.tokenizer_file``), else the file ``data.tokenizer`` names
    (:func:`turnout.trainer.data.tokenizer_files.save`).
    """
    tag = step_tag(step)
    tmp_tag = f".tmp-{tag}"
    rank = groups.rank
    folder = run_dir / tmp_tag
    model = engine.module
    ensure_optimizer_state(engine)  # a no-op once the engine has stepped
    # Collective per parameter: every rank walks the same names in the same order.
    dense = {n: get_master(engine, p) for n, p in _dense_params(model).items()}
    experts = expert_bank_params(model)
    expert_state = {n: get_master(engine, p) for n, (p, _) in experts.items()}
    buffers = {n: b.detach().cpu().clone() for n, b in persistent_buffers(model).items()}
    needed = disk.state_bytes(dense, buffers) + groups.ep_size * disk.state_bytes(expert_state)
    failure = ""
    if rank == 0:
        previous = latest_tag(run_dir)  # the last one: config and tokenizer counted too
        needed = max(needed, manifest.total_bytes(run_dir / previous) if previous else 0)
        try:
            with disk.writing(folder, needed):
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
            disk.warn_if_short(run_dir, needed, f"checkpoint {tag}")
        except DiskError as e:
            failure = e.message
    # Every rank stops here together when rank 0 cannot even make the folder.
    failure = str(broadcast_object(failure, name="checkpoint folder"))
    if failure:
        raise DiskError(failure)
    hashed: dict[str, dict[str, Any]] = {}  # the files this rank wrote -> manifest entries
    try:
        if experts and groups.layout.edp_rank(rank) == 0:
            offsets = {n: off for n, (_, off) in experts.items()}
            path = expert_slice_file(folder, groups.ep_rank)
            disk.save_tensors({"offset": offsets, "params": expert_state}, path, needed)
            hashed[path.name] = manifest.file_entry(path)  # hashed while in the page cache
        if rank == 0:
            aliases = _tied_aliases(model)
            dense_file = {"params": dense, "buffers": buffers, "aliases": aliases}
            disk.save_tensors(dense_file, folder / DENSE_FILE, needed)
            meta = _meta(engine, step, client_state, groups, bool(experts))
            disk.save_tensors(meta, folder / META_FILE, needed)
            if cfg is not None:
                with disk.writing(folder / CONFIG_FILE, needed):
                    (folder / CONFIG_FILE).write_text(to_yaml(cfg))
                    from turnout.trainer.data import tokenizer_files

                    tokenizer_files.save(folder, cfg, tokenizer_file)
    except DiskError as e:
        failure = e.message
    known: dict[str, dict[str, Any]] = {}
    first = ""  # the lowest rank's failure: the same on every rank after the gather
    for entries in all_gather_object((hashed, failure), name="checkpoint manifest"):
        files, error = cast(tuple[dict[str, dict[str, Any]], str], entries)
        known.update(files)
        first = first or error
    final = run_dir / tag
    if rank == 0 and not first:
        try:
            with disk.writing(folder, needed):
                manifest.write(folder, known)  # last: a folder with a manifest is finished
                if final.exists():
                    shutil.rmtree(final)
                os.replace(folder, final)
                write_atomic(run_dir / LATEST, tag)
        except DiskError as e:
            first = e.message
    if rank == 0 and first:  # no rank writes into it any more
        shutil.rmtree(folder, ignore_errors=True)
    # The end of the save on every rank: all raise rank 0's line together, or none does.
    first = str(broadcast_object(first if rank == 0 else "", name="checkpoint"))
    if first:
        raise DiskError(first)
    return final


def _weight_dtype(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return str(p.dtype).removeprefix("torch.") if p is not None else "float32"


def _meta(
    engine: Any, step: int, client_state: dict, groups: ParallelGroups, has_experts: bool
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "step": step,
        "client": dict(client_state),
        "optimizer_step": optimizer_step(engine),
        "scheduler_epoch": int(engine.lr_scheduler.last_epoch) if engine.lr_scheduler else 0,
        "global_steps": int(engine.global_steps),
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
        "world": groups.world,
        "ep_size": groups.ep_size,
        "zero_stage": int(engine.zero_optimization_stage()),
        "global_batch": int(engine.train_batch_size()),
        "weight_dtype": _weight_dtype(engine.module),
        "expert_files": [
            expert_slice_file(Path("."), j).name for j in range(groups.ep_size) if has_experts
        ],
    }


def load(engine: Any, path: str | os.PathLike, groups: ParallelGroups) -> dict:
    """Collective: restore weights, AdamW state, schedule and buffers at THIS engine's
    layout (any world size, ep_size, ZeRO stage); return the client state."""
    load_dir, tag = resolve_resume(path)
    folder = load_dir / tag
    meta = read_meta(folder)
    model = engine.module
    dense_file = load_file(folder / DENSE_FILE)
    saved_dense: dict[str, dict[str, torch.Tensor]] = dense_file["params"]
    dense = _dense_params(model)
    experts = expert_bank_params(model)
    files = read_expert_files(folder, meta) if experts else []
    saved_expert_names = set().union(*(f["params"] for f in files)) if files else set()
    if set(dense) != set(saved_dense) or set(experts) != saved_expert_names:
        theirs, ours = set(saved_dense) | saved_expert_names, set(dense) | set(experts)
        odd = sorted(theirs ^ ours)[:3]
        raise CheckpointError(f"{folder} holds other parameters than this model: {odd}")
    ensure_optimizer_state(engine, meta["optimizer_step"])
    for name, p in model.named_parameters():
        if name in experts:
            first, count = experts[name][1], param_shape(p)[0]
            value = {
                k: expert_rows(files, name, first, count, k, folder)
                for k in _saved_keys(files, name)
            }
        else:
            value = saved_dense[name]
        if tuple(value["param"].shape) != tuple(param_shape(p)):
            raise CheckpointError(
                f"{folder}: {name} has shape {tuple(value['param'].shape)}, "
                f"this model {tuple(param_shape(p))}"
            )
        set_master(engine, p, value)
    set_optimizer_step(engine, meta["optimizer_step"])
    refresh_model_weights(engine)
    _load_buffers(model, dense_file["buffers"], folder)
    _restore_schedule(engine, meta)
    return dict(meta["client"])


def _saved_keys(files: list[dict[str, Any]], name: str) -> tuple[str, ...]:
    """The per-parameter keys saved for ``name`` ('param' and the moments)."""
    for f in files:
        if name in f["params"]:
            return tuple(f["params"][name])
    return ()


def _load_buffers(model: nn.Module, saved: dict[str, torch.Tensor], folder: Path) -> None:
    ours = persistent_buffers(model)
    if set(ours) != set(saved):
        odd = sorted(set(ours) ^ set(saved))[:3]
        raise CheckpointError(f"{folder} holds other buffers than this model: {odd}")
    with torch.no_grad():
        for name, buf in ours.items():
            buf.copy_(saved[name].to(buf.device, buf.dtype))


def _restore_schedule(engine: Any, meta: dict[str, Any]) -> None:
    """The LambdaLR position and DeepSpeed's step counters (the group count may differ
    from the saving layout's, so the schedule is restored by position, not state dict)."""
    sched = engine.lr_scheduler
    if sched is not None:
        epoch = int(meta["scheduler_epoch"])
        sched.last_epoch = epoch
        pairs = zip(sched.base_lrs, sched.lr_lambdas, strict=True)
        lrs = [base * lam(epoch) for base, lam in pairs]
        for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs
    engine.global_steps = int(meta["global_steps"])
    engine.global_samples = engine.global_steps * int(engine.train_batch_size())
    engine.skipped_steps = int(meta["skipped_steps"])
