"""Graceful stops without Ray: the vote in the finite-loss reduction, the launcher's
signal handler and stop file, ``train.resume=auto``'s choice, the resume command, and
the grace sized for the model. The whole path through Ray: tests/e2e/test_preemption.py."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import torch

from turnout.config.load import load_config, to_yaml
from turnout.errors import EXIT_INTERRUPTED, EXIT_TERMINATED
from turnout.files import CONFIG_FILE
from turnout.launch.paths import resolve_paths
from turnout.launch.preempt import (
    STEP_ALLOWANCE_S,
    DriverStop,
    Terminated,
    checkpoint_seconds,
    grace_s,
    resume_command,
    write_speed,
)
from turnout.trainer.checkpointing import manifest
from turnout.trainer.planner.plan import plan
from turnout.trainer.resume.auto import resolve_auto
from turnout.trainer.step import agree_step
from turnout.trainer.stop import STOP_FILE, PreemptedError, StopVote, stop_requested

pytestmark = pytest.mark.unit


def test_the_vote_rides_on_the_finite_loss_reduction() -> None:
    # world 1 without a process group: the all-reduce is the identity.
    loss, ce = torch.tensor(2.5), torch.tensor(2.0)
    mean, vote = agree_step(loss, ce, step=1, rank=0, world=1)
    assert mean == pytest.approx(2.0) and vote == StopVote() and not vote.stop
    _, vote = agree_step(loss, ce, step=1, rank=0, world=1, asks=(False, True))
    assert vote.signalled_ranks == (0,) and vote.preempted
    assert vote.reason() == "SIGTERM to rank(s) 0"
    _, vote = agree_step(loss, ce, step=1, rank=0, world=1, asks=(True, True))
    assert vote.launcher and vote.stop and not vote.preempted  # the launcher ends the job


def test_preempted_error_survives_pickling_for_the_driver() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(PreemptedError(7, "SIGTERM to rank(s) 1", "/c/step7")))
    assert (err.step, err.checkpoint) == (7, "/c/step7")
    assert "stopped after step 7" in str(err)


def test_the_launcher_signal_writes_the_stop_file_and_a_second_stops_at_once(
    tmp_path: Path,
) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = DriverStop(grace_s=60.0)
    try:
        stop.install()
        with pytest.raises(Terminated):  # no job yet: nothing to checkpoint, leave now
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.exit_code == EXIT_TERMINATED

        stop = DriverStop(grace_s=60.0)
        stop.arm(tmp_path)
        assert stop_requested(tmp_path) == ""
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next line
        assert stop.name == "SIGINT" and stop.exit_code == EXIT_INTERRUPTED
        assert (tmp_path / STOP_FILE).is_file()
        assert stop_requested(tmp_path) == "SIGINT to the launcher"
        assert not stop.expired()
        with pytest.raises(KeyboardInterrupt):  # the second one
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_resume_command_asks_for_auto_once() -> None:
    argv = ["train", "tiny", "train.steps=9", "train.resume=/old/step3", "tracking.uri=a b"]
    assert resume_command(argv) == (
        "turnout train tiny train.steps=9 'tracking.uri=a b' train.resume=auto"
    )


def _saved(ckpt_dir: Path, run: str, step: int, cfg_yaml: str) -> Path:
    folder = ckpt_dir / run / f"step{step}"
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(cfg_yaml)
    manifest.write(folder)
    return folder


def test_auto_resumes_the_newest_checkpoint_of_the_same_config(tmp_path: Path) -> None:
    cfg = resolve_paths(load_config("tiny", ["train.resume=auto"]), tmp_path)
    ckpt = Path(cfg.train.ckpt_dir)
    assert resolve_auto(cfg).train.resume == ""  # nothing yet: a fresh start
    same = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="/x/step2"))
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=7))
    _saved(ckpt, "run-a", 10, to_yaml(same))
    newest = _saved(ckpt, "run-b", 20, to_yaml(same))  # a later attempt of the same job
    _saved(ckpt, "run-c", 30, to_yaml(other))  # another job's, further on
    (ckpt / "run-d" / "step40").mkdir(parents=True)  # a save that never finished
    assert resolve_auto(cfg).train.resume == str(newest)
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=""))
    assert resolve_auto(plain) is plain  # only 'auto' is looked up


def test_the_default_grace_is_sized_for_the_model(tmp_path: Path) -> None:
    cfg = load_config("tiny", [])
    speed = write_speed(tmp_path / "not" / "made")  # measured where it will be written
    assert speed > 0 and not (tmp_path / "not").exists() and not list(tmp_path.iterdir())
    nbytes, seconds = checkpoint_seconds(cfg, speed)
    assert nbytes == plan(cfg).params.total * 12  # fp32 master + two AdamW moments
    assert grace_s(cfg, seconds) == pytest.approx(STEP_ALLOWANCE_S + 2 * seconds)
    set_by_hand = load_config("tiny", ["launch.preempt_grace_s=45"])
    assert grace_s(set_by_hand, seconds) == 45.0
