"""Run a function on N spawned gloo ranks and collect each rank's return value.

Used by the distributed tier: every test there compares what the ranks computed with
the single-process reference on the same seed and weights.

The ranks are forked from a ``forkserver`` that imported torch, DeepSpeed and turnout's
trainer once per test session (a fresh ``spawn`` spends ~4 s of 2 cores importing them
for every test). A forked rank gets the caller's environment of the moment (a test's
``monkeypatch.setenv``), not the server's, and sets its own threads; nothing in the
server has run an op, so there are no thread pools to inherit.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from tests.threads import intra_op_threads
from turnout.parallel.dist import (
    DEFAULT_TIMEOUT_S,
    free_port,
    init_distributed,
    leave_process_group,
)

#: Imported once by the fork server, before it forks any rank.
PRELOAD = ["torch", "deepspeed", "turnout.trainer.train", "tests.spawn"]


def _entry(
    rank: int,
    world: int,
    port: int,
    outdir: str,
    fn: Callable,
    args: tuple,
    timeout_s: float,
    env: dict[str, str],
) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(intra_op_threads())
    path = os.path.join(outdir, f"rank{rank}.pt")
    finished = False
    try:
        init_distributed("gloo", timeout_s)
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, path)
        finished = True
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        leave_process_group(finished)


def run_ranks(
    fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[Any]:
    """Spawn ``world`` gloo ranks running ``fn(rank, world, *args)``; return their results.

    ``timeout_s`` bounds every collective (the process group's timeout).

    ``fn`` must be a module-level function (picklable). A failure on any rank raises
    with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as outdir:
        try:
            multiprocessing.set_forkserver_preload(PRELOAD)
            mp.start_processes(
                _entry,
                args=(world, free_port(), outdir, fn, args, timeout_s, dict(os.environ)),
                nprocs=world,
                join=True,
                start_method="forkserver",
            )
        except Exception as e:
            errors = []
            for r in range(world):
                p = os.path.join(outdir, f"rank{r}.pt")
                if os.path.exists(p):
                    rec = torch.load(p, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"rank {r}:\n{rec['error']}")
            raise RuntimeError("\n".join(errors) or str(e)) from e
        return [
            torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)["result"]
            for r in range(world)
        ]
