"""Process-group setup and the few collectives the trainer needs.

``init_distributed`` is the one place a turnout process creates its default process
group; the worker entry (``turnout.launch.worker``) calls it once per process. It reads
the rendezvous environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK),
which torchrun sets, and which turnout's Ray backend (``turnout.launch.ray_backend``)
sets on every Ray Train worker; with none set it creates a single-process group of
world 1. It refuses to run twice, so no other code path can have created the group.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from turnout.config.choices import Backend

#: How long a collective may wait for the slowest rank (a rank-0 checkpoint write or
#: token-cache build included) before the process group gives up.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


def resolve_backend(backend: str, use_gpu: bool) -> str:
    """parallel.backend 'auto' -> nccl when the run uses GPUs (launch.use_gpu), else gloo.

    Decided from the config, not from this process's CUDA: a launcher without a GPU may
    start GPU workers.
    """
    if backend != Backend.AUTO:
        return Backend(backend).value
    return Backend.NCCL.value if use_gpu else Backend.GLOO.value


def free_port() -> int:
    """A TCP port that is free on every interface of this host right now.

    Bound on all interfaces (not only loopback), so the port also serves a rendezvous
    on this node's network address.
    """
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(backend: str) -> tuple[int, int]:
    """Create the default process group with ``backend`` (gloo or nccl) from the
    rendezvous environment; return (rank, world).

    Raises RuntimeError when a process group already exists: the group is created here
    and nowhere else.
    """
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialised; init_distributed must be the only "
            "place that creates the process group"
        )
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(
        backend,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=PROCESS_GROUP_TIMEOUT,
    )
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    """The device this rank computes on (its GPU under NCCL, else the CPU)."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (in place on a copy on the collective's device); returns CPU."""
    out = t.detach().to(device(), copy=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
