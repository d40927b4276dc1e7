"""Process-group setup and the few collectives the trainer needs.

``init_distributed`` is a no-op when ``torch.distributed`` is already initialised
(Ray Train does that for its workers); otherwise it reads the torchrun environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and falls back to a
single-process group of world 1 when none is set.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def resolve_backend(backend: str, use_gpu: bool) -> str:
    """parallel.backend 'auto' -> nccl when the run uses GPUs (launch.use_gpu), else gloo.

    Decided from the config, not from this process's CUDA: a launcher without a GPU may
    start GPU workers.
    """
    if backend != "auto":
        return backend
    return "nccl" if use_gpu else "gloo"


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


def init_distributed(backend: str = "gloo") -> tuple[int, int]:
    """Join (or create) the default process group with ``backend`` (gloo or nccl);
    return (rank, world)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        name = backend
        if name == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(
            name,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timedelta(minutes=30),
        )
    elif torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.set_device(local_rank())
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
