"""``turnout train --launcher torchrun``: the worker entry under torchrun, on this machine.

Every rank runs on this host, so nothing of the job listens beyond loopback:

- the rendezvous is torchrun's c10d one on a :class:`~torch.distributed.FileStore` in a
  private temporary folder (its default is a TCPStore, which listens on every interface);
- torchrun's agent does not share a TCPStore of its own with the workers
  (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``), and names 127.0.0.1 as their
  ``MASTER_ADDR`` (``--local-addr``); the workers' process group then keeps its store
  and gloo/NCCL on loopback (:func:`turnout.parallel.dist.init_distributed`).

A signal to the launcher (SIGTERM, or Ctrl-C, which reaches only the launcher: torchrun
runs in a session of its own) asks the ranks to stop, as under Ray
(:class:`turnout.launch.preempt.DriverStop`): every rank stops after the same step and
saves it; rank 0 writes its result and exits 0, and the launcher prints the one line
that names the checkpoint and ends the MLflow run KILLED. A second signal, or the grace
running out, stops torchrun at once (SIGTERM; SIGKILL 30 s later).

The ranks run the config the launcher resolved and checked (paths made absolute,
``train.resume=auto`` as the checkpoint found, the tracking URI, which may hold a
password) from a file in that private folder, not from a command line, which ``ps``
shows to every user of the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from turnout.config import TurnoutConfig
from turnout.errors import ConfigError
from turnout.launch.preempt import DriverStop
from turnout.launch.processes import die_with_parent
from turnout.launch.tracked_run import open_tracked_run
from turnout.launch.worker import ATTACH_ENV, RESULT_ENV, RUN_DIR_ENV
from turnout.trainer.resume.recovery import run_folder

#: Overrides for ``turnout train`` as a JSON list of ``key=value``, applied after its
#: command line's: how a sweep trial hands it the ones no command line may show (``ps``
#: shows command lines to every user of the machine).
OVERRIDES_ENV = "TURNOUT_LAUNCHER_OVERRIDES"
#: Overrides that travel in :data:`OVERRIDES_ENV`, never on a command line.
SECRET_KEYS = ("tracking.uri",)


def launcher_overrides() -> list[str]:
    """The overrides in :data:`OVERRIDES_ENV` (none when unset)."""
    try:
        found = json.loads(os.environ.get(OVERRIDES_ENV) or "[]")
    except ValueError:
        found = None
    if not isinstance(found, list) or not all(isinstance(item, str) for item in found):
        raise ConfigError(OVERRIDES_ENV, "must be a JSON list of key=value strings")
    return found


def split_secret(items: list[str]) -> tuple[list[str], list[str]]:
    """``items`` as (the ones a command line may show, the ones of :data:`SECRET_KEYS`)."""
    secret = [i for i in items if i.split("=", 1)[0].strip() in SECRET_KEYS]
    return [i for i in items if i not in secret], secret


#: torchrun's agent hands its workers no TCPStore of its own (module doc).
LOOPBACK_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def loopback_command(nproc: int, folder: Path) -> list[str]:
    """torchrun for ``nproc`` ranks on this host, its rendezvous a file in ``folder``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={folder / 'rendezvous'}",
        "--rdzv-conf=store_type=file",
        f"--rdzv-id={folder.name}",
        "--local-addr=127.0.0.1",
    ]


def _result(path: Path) -> dict[str, Any]:
    """Rank 0's result ({} when it wrote none)."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return res if isinstance(res, dict) else {}


def _end_now(proc: subprocess.Popen) -> int:
    """Stop torchrun and its ranks now: SIGTERM, SIGKILL 30 s later; its exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _wait(proc: subprocess.Popen, stop: DriverStop) -> int:
    """torchrun's exit code; it is stopped at once on a second signal or past the grace."""
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if stop.expired():
                    return _end_now(proc)
    except KeyboardInterrupt:  # a second signal (Terminated is one too)
        return _end_now(proc)


def train_torchrun(cfg: TurnoutConfig, stop: DriverStop) -> int:
    """Run the same worker entry under torchrun on this machine (no Ray).

    The MLflow run is the launcher's here too: opened before torchrun starts, handed to
    the workers (rank 0 attaches and logs), and ended by the job's end: FINISHED, KILLED
    (a signal to this launcher, ``stop``) or FAILED (anything else, a SIGKILLed rank
    included). torchrun gets SIGTERM if this launcher dies
    (:func:`turnout.launch.processes.die_with_parent`)."""
    tracked = open_tracked_run(cfg)
    rendezvous = Path(tempfile.mkdtemp(prefix="turnout-rdzv-"))  # only this user's (0700)
    run_dir = run_folder(cfg, tracked.run_id)
    # The ranks run the config this launcher resolved and checked (paths absolute,
    # train.resume=auto as the checkpoint found, the tracking URI with any password),
    # from a file only this user can read, not from a command line `ps` shows.
    config_file = rendezvous / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    cmd = [*loopback_command(cfg.launch.num_workers, rendezvous), "-m", "turnout.launch.worker"]
    env = dict(os.environ, **LOOPBACK_ENV)
    env.update({ATTACH_ENV: tracked.run_id, RUN_DIR_ENV: str(run_dir)})
    env.pop(OVERRIDES_ENV, None)  # the launcher's own, already in the file
    # Rank 0's result (a sweep trial names its own file): after a stop, where it saved.
    result_file = Path(env.setdefault(RESULT_ENV, str(rendezvous / "result.json")))
    proc: subprocess.Popen | None = None
    try:
        proc = subprocess.Popen(
            [*cmd, str(config_file)], env=env, preexec_fn=die_with_parent, start_new_session=True
        )
        stop.arm(run_dir)
        code = _wait(proc, stop)
        res = _result(result_file) if stop.signum else {}
    except BaseException:  # a signal before the stop was armed, or a bug of ours
        if proc is not None and proc.poll() is None:
            _end_now(proc)
        tracked.end("KILLED" if stop.signum else "FAILED")
        raise
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)
    if stop.signum:
        return stop.finish(tracked, res)
    tracked.end("FINISHED" if code == 0 else "FAILED")
    return code
