"""Errors as data: the types, their one line, the exit codes, and a worker's failure
reaching the launcher through Ray's own exception without any text parsing."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from turnout.errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    CheckpointError,
    ConfigError,
    RunError,
    TurnoutError,
    WorkerError,
    error_line,
    one_line,
)
from turnout.launch.ray.failures import find_worker_error
from turnout.launch.worker import worker_error

pytestmark = pytest.mark.unit


def _through_pickle(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj))


def test_config_error_keeps_its_form_and_pickles() -> None:
    e = ConfigError("model.moe.top_k", "must be <= 4")
    assert str(e) == "model.moe.top_k: must be <= 4"
    assert isinstance(e, TurnoutError) and isinstance(e, ValueError)
    back = _through_pickle(e)
    assert isinstance(back, ConfigError)
    assert (back.key, back.message, str(back)) == (e.key, e.message, str(e))


def test_runtime_errors_are_not_config_errors() -> None:
    e = CheckpointError("/c/step3 holds other expert parameters than this model")
    assert isinstance(e, RunError) and not isinstance(e, ConfigError)
    assert e.key == "train.resume"
    assert str(e) == "train.resume: /c/step3 holds other expert parameters than this model"
    assert str(RunError("store down")) == "store down"
    back = _through_pickle(RunError("store down", key="tracking.uri"))
    assert isinstance(back, RunError) and back.key == "tracking.uri"


def test_one_line_takes_the_first_line() -> None:
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(ConfigError("a.b", "bad\n  value")) == "a.b: bad value"
    assert error_line("x:\n  y") == "turnout: error: x: y"


def test_worker_error_round_trips_through_pickle() -> None:
    e = WorkerError("runtime", "NonFiniteLossError: non-finite loss", 1, log="/t/rank1.log")
    back = _through_pickle(e)
    assert isinstance(back, WorkerError)
    assert (back.kind, back.message, back.rank, back.key, back.log) == (
        "runtime",
        "NonFiniteLossError: non-finite loss",
        1,
        "",
        "/t/rank1.log",
    )
    assert back.text() == (
        "training failed on rank 1: NonFiniteLossError: non-finite loss (traceback: /t/rank1.log)"
    )
    assert back.exit_code == EXIT_FAILED


def test_a_worker_turns_any_exception_into_a_record(tmp_path: Path) -> None:
    try:
        raise ConfigError("data.corpus", "too small")
    except ConfigError as exc:
        cfg = worker_error(exc, 0, tmp_path)
    assert (cfg.kind, cfg.key, cfg.message, cfg.rank) == ("config", "data.corpus", "too small", 0)
    assert cfg.exit_code == EXIT_CONFIG
    assert cfg.text() == "data.corpus: too small"  # the same line as on the launcher
    assert "ConfigError" in Path(cfg.log).read_text()

    run = worker_error(CheckpointError("cannot load"), 1, tmp_path)
    assert (run.kind, run.key, run.rank) == ("runtime", "train.resume", 1)
    assert run.message == "train.resume: cannot load"
    assert run.log == str(tmp_path / "rank1.log")

    bug = worker_error(KeyError("w"), 1, tmp_path)
    assert (bug.kind, bug.key, bug.message) == ("runtime", "", "KeyError: 'w'")


def test_the_driver_reads_the_lowest_rank_record() -> None:
    from ray.train.v2.api.exceptions import WorkerGroupError

    r1 = WorkerError("runtime", "NonFiniteLossError: at step 3", 1, log="/t/rank1.log")
    r0 = WorkerError("runtime", "NonFiniteLossError: at step 3", 0, log="/t/rank0.log")
    # Ray pickles the exception across processes: do the same.
    err = _through_pickle(WorkerGroupError("boom\nmore", {1: r1, 0: r0}))
    found = find_worker_error(err, Path("/t"))
    assert (found.rank, found.log, found.kind) == (0, "/t/rank0.log", "runtime")

    cfg = WorkerError("config", "too small", 1, key="data.corpus", log="/t/rank1.log")
    found = find_worker_error(_through_pickle(WorkerGroupError("b", {1: cfg})), Path("/t"))
    assert found.exit_code == EXIT_CONFIG
    assert error_line(found.text()) == "turnout: error: data.corpus: too small"


def test_a_worker_that_died_without_a_record_is_a_crash() -> None:
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    text = "Traceback (most recent call last):\n  File x\nOSError: disk full"
    found = find_worker_error(WorkerGroupError("b", {2: RuntimeError(text)}), Path("/logs"))
    assert (found.kind, found.rank, found.message) == ("crash", 2, "OSError: disk full")
    assert found.text() == "training failed on rank 2: OSError: disk full (worker logs: /logs)"
    assert found.exit_code == EXIT_FAILED

    found = find_worker_error(ControllerError(RuntimeError("lost\nnode")), Path("/logs"))
    assert (found.kind, found.rank) == ("crash", -1)
    assert found.message == "Ray Train controller: RuntimeError: lost"
