"""Automatic recovery's decisions without Ray: which checkpoint a restart resumes from,
the steps it redoes, which failures end the job at once, and the config key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from turnout.config.load import load_config
from turnout.errors import ConfigError, DiskError, RunError, WorkerError
from turnout.launch.ray.failures import find_worker_error, gave_up
from turnout.launch.ray.restarts import FinalWorkerError, is_final, worker_failure
from turnout.launch.summary import format_summary
from turnout.models.kernels import KernelMismatchError
from turnout.parallel.dist import CollectiveError
from turnout.trainer.checkpointing import manifest
from turnout.trainer.checkpointing.files import LATEST, META_FILE
from turnout.trainer.resume.recovery import (
    begin_attempt,
    newest_checkpoint,
    read_recovery,
)
from turnout.trainer.skips import SkippedStepsError
from turnout.trainer.step import NonFiniteLossError

pytestmark = pytest.mark.unit


def _checkpoint(run_dir: Path, step: int, point_latest: bool = True) -> Path:
    folder = run_dir / f"step{step}"
    folder.mkdir(parents=True)
    torch.save({"format": "x", "step": step}, folder / META_FILE)
    manifest.write(folder)
    if point_latest:
        (run_dir / LATEST).write_text(folder.name)
    return folder


def test_newest_checkpoint_is_the_newest_complete_one(tmp_path: Path) -> None:
    assert newest_checkpoint(tmp_path) is None
    step10 = _checkpoint(tmp_path, 10)
    assert newest_checkpoint(tmp_path) == step10
    # Saved whole (manifest written) but killed before latest moved on: it counts.
    step20 = _checkpoint(tmp_path, 20, point_latest=False)
    assert newest_checkpoint(tmp_path) == step20
    (tmp_path / "step30").mkdir()  # a folder without a manifest: not a finished save
    (tmp_path / ".tmp-step40").mkdir()  # an unfinished save's hidden folder
    assert newest_checkpoint(tmp_path) == step20
    (step20 / META_FILE).write_bytes(b"cut")  # damaged later: fall back to the one before
    assert newest_checkpoint(tmp_path) == step10
    (tmp_path / LATEST).write_bytes(b"\xff\xfe\x00garbage")  # latest plays no part
    assert newest_checkpoint(tmp_path) == step10


def test_attempts_resume_from_the_newest_checkpoint_and_count_steps_redone(
    tmp_path: Path,
) -> None:
    first = begin_attempt(tmp_path, rank=0, own_resume="")
    assert (first.number, first.resume, first.restarts) == (0, "", [])
    for step in range(1, 8):
        first.record(step)
    assert read_recovery(tmp_path) == {"attempt": 0, "step": 7, "restarts": []}

    # Died after step 7 with no checkpoint of its own: from scratch, 7 steps redone.
    second = begin_attempt(tmp_path, rank=0, own_resume="")
    assert (second.number, second.resume) == (1, "")
    assert second.restarts[-1].redone == 7
    step10 = _checkpoint(tmp_path, 10)
    for step in range(1, 14):
        second.record(step)

    # Died after step 13: resume from step10, 3 redone (10 in all).
    third = begin_attempt(tmp_path, rank=0, own_resume="")
    assert (third.number, third.resume) == (2, str(step10))
    assert [(r.from_step, r.failed_at, r.redone) for r in third.restarts] == [
        (0, 7, 7),
        (10, 13, 3),
    ]
    assert third.steps_redone == 10
    assert read_recovery(tmp_path)["attempt"] == 2  # type: ignore[index]


def test_a_restart_without_its_own_checkpoint_goes_back_to_train_resume(tmp_path: Path) -> None:
    earlier = tmp_path / "earlier"
    _checkpoint(earlier, 40)
    run_dir = tmp_path / "run"
    begin_attempt(run_dir, rank=0, own_resume=str(earlier)).record(45)
    again = begin_attempt(run_dir, rank=0, own_resume=str(earlier))
    assert again.resume == str(earlier)
    assert (again.restarts[-1].from_step, again.restarts[-1].redone) == (40, 5)


def test_the_summary_counts_restarts_and_steps_redone() -> None:
    cfg = load_config("tiny")
    text = format_summary(cfg, {"steps": 60, "restarts": 1, "steps_redone": 5})
    assert re.search(r"^  restarts +1 ", text, re.MULTILINE), text
    assert re.search(r"^  steps redone +5 ", text, re.MULTILINE), text
    assert "restarts" not in format_summary(cfg, {"steps": 60, "restarts": 0})


@pytest.mark.parametrize(
    ("error", "final"),
    [
        (ConfigError("train.resume", "no such folder"), True),
        (RunError("cannot open the MLflow store", key="tracking.uri"), True),
        (NonFiniteLossError(5, [0], 2), True),
        (SkippedStepsError(9, 4, 3), True),
        (KernelMismatchError("plan differs"), True),
        (DiskError("no space left on device (ENOSPC) writing /c/.tmp-step20/dense.pt"), True),
        (CollectiveError("all-reduce", "Connection closed by peer"), False),
        (RuntimeError("gloo: connection reset"), False),
        (MemoryError(), False),
    ],
)
def test_failures_a_restart_would_repeat_are_final(error: BaseException, final: bool) -> None:
    assert is_final(error) is final


def test_a_final_record_survives_pickling_and_wins_the_report(tmp_path: Path) -> None:
    import pickle

    record = worker_failure(NonFiniteLossError(5, [1], 2), 1, tmp_path)
    assert isinstance(record, FinalWorkerError) and record.kind == "runtime"
    back = pickle.loads(pickle.dumps(record))
    assert type(back) is FinalWorkerError and back.text() == record.text()
    assert (tmp_path / "rank1.log").is_file()

    class ControllerFailed(Exception):  # the shape of Ray's ControllerError
        controller_failure = back

    assert find_worker_error(ControllerFailed(), tmp_path) is back
    assert gave_up(back, 3) is back  # no 'restarts did not help' on a final error
    plain = worker_failure(RuntimeError("gloo: connection reset"), 0, tmp_path)
    assert not isinstance(plain, FinalWorkerError)


def test_a_failure_restarts_did_not_cure_says_so() -> None:
    crash = WorkerError("crash", "ActorDiedError: the actor died", 1, log="/logs")
    assert "(no restart: launch.max_failures=0)" in gave_up(crash, 0).text()
    assert "after 3 restart(s), launch.max_failures=3" in gave_up(crash, 3).text()


def test_max_failures_is_checked() -> None:
    assert load_config("tiny").launch.max_failures > 0
    assert load_config("tiny", ["launch.max_failures=0"]).launch.max_failures == 0
    with pytest.raises(ConfigError, match=r"^launch\.max_failures: must be >= 0, got -1$"):
        load_config("tiny", ["launch.max_failures=-1"])


def test_the_dead_worker_is_named_not_the_peer_whose_collective_failed(tmp_path: Path) -> None:
    from ray.train.v2.api.exceptions import WorkerGroupError

    peer_gone = CollectiveError("all-reduce", "Connection closed by peer")
    echo = worker_failure(peer_gone, 0, tmp_path)
    dead = RuntimeError("ActorDiedError: The actor died unexpectedly")
    found = find_worker_error(WorkerGroupError("b", {0: echo, 1: dead}), Path("/logs"))
    assert (found.kind, found.rank) == ("crash", 1)
    # Without a dead worker (a hang that timed out), the collective's record is the news.
    found = find_worker_error(WorkerGroupError("b", {0: echo}), Path("/logs"))
    assert found is echo
