"""Ray Train's torch backend, minus the process group: Ray publishes the rendezvous only.

Ray's own ``TorchConfig`` backend calls ``torch.distributed.init_process_group`` on
every worker before the training function runs. turnout creates its process group in
one place, ``turnout.parallel.dist.init_distributed``, called by the worker entry
(``turnout.launch.worker.run_worker``), exactly as under torchrun. So
:class:`RendezvousConfig` keeps ``TorchConfig`` (``TorchTrainer`` requires one, and its
per-worker CUDA device context is wanted) but swaps the backend class, the extension
point Ray's own ``TorchftConfig`` uses, for :class:`RendezvousBackend`, which only sets
the torchrun environment on each worker:

- MASTER_ADDR / MASTER_PORT: the node address of worker 0 and a port free there; when
  every worker runs on one node, 127.0.0.1 instead, so the rendezvous and the group stay
  on loopback (``turnout.parallel.dist.init_distributed``);
- RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK: from the worker's Ray
  Train context;
- GLOO_SOCKET_IFNAME, when the workers span more than one node (and the user has not
  set it): the interface that holds this node's Ray address. Left alone, gloo binds to
  whatever the host name resolves to, often 127.0.0.1, and no peer on another node can
  reach that. Each rank then prints one line naming its node and interface.

It also installs each worker's SIGTERM handler
(:func:`turnout.trainer.stop.install_handlers`) on the worker's main thread, where the
worker group's ``execute`` runs, after Ray's own: a SIGTERMed worker then asks every
rank to stop after the step and checkpoint instead of aborting.

Only Ray's developer API is used (``Backend`` hooks and the worker group's
``execute``/``execute_single``); nothing of Ray's private torch setup.
"""

from __future__ import annotations

import os
from typing import Any

from ray.train.backend import Backend
from ray.train.torch import TorchConfig


def _node_address_and_port() -> tuple[str, int]:
    """Runs on worker 0: this node's address and a port free on it."""
    import ray

    from turnout.parallel.dist import free_port

    return ray.util.get_node_ip_address(), free_port()


def _publish_rendezvous(addr: str, port: int) -> None:
    """Runs on every worker: the environment ``init_distributed`` reads."""
    import ray
    import ray.train

    from turnout.parallel.dist import interface_of

    ctx = ray.train.get_context()
    if ctx.get_local_world_size() == ctx.get_world_size():  # one node: worker 0 is here
        addr = "127.0.0.1"
    else:
        node_ip = ray.util.get_node_ip_address()
        ifname = os.environ.get("GLOO_SOCKET_IFNAME") or interface_of(node_ip)
        if ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
        print(
            f"turnout: rank {ctx.get_world_rank()} on node {ctx.get_node_rank()} "
            f"({node_ip}, gloo on {ifname or 'the host name'}), rendezvous {addr}:{port}",
            flush=True,
        )
    os.environ.update(
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
        RANK=str(ctx.get_world_rank()),
        WORLD_SIZE=str(ctx.get_world_size()),
        LOCAL_RANK=str(ctx.get_local_rank()),
        LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
        NODE_RANK=str(ctx.get_node_rank()),
    )


def _install_stop_handlers() -> bool:
    """Runs on every worker's main thread: SIGTERM becomes a stop request."""
    from turnout.trainer.stop import install_handlers

    return install_handlers()


class RendezvousBackend(Backend):
    """Sets the rendezvous environment on every worker; never creates a process group."""

    # Every worker on a node sees all of the node's GPUs the run holds, so LOCAL_RANK
    # selects the device (as under torchrun and Ray's own torch backend).
    share_cuda_visible_devices: bool = True

    def on_training_start(self, worker_group: Any, backend_config: Any) -> None:
        # The Ray Train context (ranks) is available from here on, in Ray Train v1 and v2.
        addr, port = worker_group.execute_single(0, _node_address_and_port)
        worker_group.execute(_publish_rendezvous, addr=addr, port=port)
        worker_group.execute(_install_stop_handlers)


class RendezvousConfig(TorchConfig):
    """``TorchConfig`` whose backend leaves the process group to ``init_distributed``."""

    @property
    def backend_cls(self) -> type[Backend]:
        return RendezvousBackend
