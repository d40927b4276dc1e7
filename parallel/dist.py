"""Process-group setup and the few collectives the trainer needs.

``init_distributed`` is the one place a turnout process creates its default process
group; the worker entry (``turnout.launch.worker``) calls it once per process. It reads
the rendezvous environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK),
which torchrun sets, and which turnout's Ray backend (``turnout.launch.ray.backend``)
sets on every Ray Train worker; with none set it creates a single-process group of
world 1. It refuses to run twice, so no other code path can have created the group.

A rendezvous on a loopback address (every rank on this host: a single-node run, the
embedded Ray cluster) stays on loopback: rank 0's store listens on that address only
(not on every interface, as torch's TCPStore does when left alone), and gloo and NCCL
are pointed at the loopback interface (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``,
where the user has not set them). Nothing of the group is reachable from the network.

Every collective waits at most ``parallel.timeout_s`` (the group's timeout) for the
other ranks. The collectives here, and the blocks of the training step wrapped in
:func:`collective`, turn a backend failure (gloo's "Timed out waiting ...", a peer that
closed its connection, an NCCL error) into a :class:`CollectiveError` that names the
collective, so the job's one error line says which rank stalled where.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from turnout.config.choices import Backend
from turnout.errors import RunError

#: How long a collective may wait for the slowest rank by default (``parallel.timeout_s``).
DEFAULT_TIMEOUT_S = 300.0
_BACKEND_MARKERS = ("gloo", "nccl", "timed out", "timeout", "connection", "pair closure")


class CollectiveError(RunError):
    """A collective failed on this rank (a timeout, or a peer that went away)."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"collective {name!r} failed: {detail}", key="parallel.timeout_s")
        self.name = name
        self.detail = detail

    def __reduce__(self) -> tuple[type[CollectiveError], tuple[str, str]]:
        return (type(self), (self.name, self.detail))


def _is_backend_error(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(m in text for m in _BACKEND_MARKERS)


@contextmanager
def collective(name: str) -> Iterator[None]:
    """Re-raise a process-group failure inside the block as CollectiveError(``name``)."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:
        if not _is_backend_error(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = first.split("] ", 1)[-1] if first.startswith("[") else first  # gloo's path
        raise CollectiveError(name, first[:300]) from e


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


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this host's loopback."""
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


def interface_of(ip: str) -> str | None:
    """The name of this host's network interface that holds address ``ip`` (None: none)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] == ip for a in addrs):
            return name
    return None


def _loopback_store(addr: str, port: int, rank: int, world: int, timeout_s: float) -> Any:
    """The group's TCPStore, rank 0's server listening on loopback ``addr`` only."""
    timeout = timedelta(seconds=timeout_s)
    host = "127.0.0.1" if addr == "localhost" else addr
    if rank != 0:
        return dist.TCPStore(host, port, world, False, timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    # The store owns the descriptor from here on (it closes it).
    return dist.TCPStore(host, port, world, True, timeout, master_listen_fd=listener.detach())


def _stay_on_loopback() -> None:
    """Point gloo and NCCL at the loopback interface, unless the user chose one."""
    lo = interface_of("127.0.0.1")
    if lo:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(backend: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Create the default process group with ``backend`` (gloo or nccl) from the
    rendezvous environment, its collectives bounded by ``timeout_s``; return (rank, world).

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
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr = os.environ.get("MASTER_ADDR", "")
    store = None
    if is_loopback(addr):
        _stay_on_loopback()
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # torchrun's agent's
            store = _loopback_store(addr, int(os.environ["MASTER_PORT"]), rank, world, timeout_s)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    """The device this rank computes on (its GPU under NCCL, else the CPU)."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, name: str = "all_reduce") -> torch.Tensor:
    """Sum over all ranks (in place on a copy on the collective's device); returns CPU.
    ``name`` says what the sum is for, in a CollectiveError."""
    out = t.detach().to(device(), copy=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        with collective(name):
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def broadcast_object(obj: object, src: int = 0, name: str = "broadcast") -> object:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    with collective(name):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object, name: str = "all_gather") -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    with collective(name):
        dist.all_gather_object(out, obj)
    return out


def barrier(name: str = "barrier") -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        with collective(name):
            dist.barrier()


def leave_process_group(finished: bool) -> None:
    """Tear the process group down. A rank that ``finished`` first meets the others at a
    barrier: a rank that closed its gloo connections while a peer still read its last
    messages would abort that peer ('Connection reset by peer' thrown on gloo's own
    thread: SIGABRT). After a failure there is no barrier (a peer may be gone); nor is a
    failed barrier an error (the work is done; a rank that caught a failed collective
    itself may finish with a broken group)."""
    if not dist.is_initialized():
        return
    if finished:
        with suppress(CollectiveError):
            barrier("leave")
    dist.destroy_process_group()
