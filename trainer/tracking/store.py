"""The MLflow run's life: open (or reopen on resume), and end it with an honest status.

Whoever opens the run ends it. Under Ray the driver opens it before any worker starts
(an unreachable store fails the job in a second, not after the workers are up) and
ends it FINISHED, FAILED (any failure, a killed worker included) or KILLED (Ctrl-C);
rank 0 of the workers attaches to it by id and only logs. Under torchrun rank 0 opens
and ends it itself.

- A local ``sqlite:///`` store is created under an exclusive file lock
  (``<db>.lock``), so two runs started at once in one folder do not both run the
  store's schema migrations.
- A new experiment is tagged ``mlflow.experimentKind = custom_model_development``, the
  kind MLflow 3's UI files model training under (it otherwise infers a GenAI kind).
- ``train.resume`` reopens the run recorded beside the checkpoint (the run folder's
  :data:`RUN_ID_FILE`, written with its first checkpoint): metrics append to the same
  run id, tagged ``resumed_from``. When the store does not know that run, a new one is
  opened with the same tag. ``tracking.run_id`` names a run to append to explicitly.
- MLflow's HTTP client retries for minutes by default; here each request is bounded
  (:data:`HTTP_DEFAULTS`, which the user's environment overrides), and the training
  loop never waits on one anyway (:mod:`turnout.trainer.tracking.queue`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from turnout.config import TurnoutConfig
from turnout.config.load import flatten, to_yaml
from turnout.errors import RunError
from turnout.files import CONFIG_FILE
from turnout.trainer.tracking.uri import local_sqlite_uri, sqlite_artifact_root, sqlite_db_path

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
RESUMED_FROM_TAG = "resumed_from"
#: The file in a checkpoint run folder that names the MLflow run its steps belong to.
RUN_ID_FILE = "mlflow_run_id"
#: Per-request bounds for MLflow's HTTP client (a down server fails a request in
#: seconds; the outbox retries it). Set only where the environment does not.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # MLflow prints "View run ... at: <store URL>" when a run ends, credentials and all;
    # turnout's summary names the store (without them) instead.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
_NOISY_LOGGERS = (
    "alembic",
    "alembic.runtime.migration",
    "mlflow.store.db.utils",
    "mlflow.system_metrics.system_metrics_monitor",
)


def quiet_mlflow() -> None:
    """Silence a fresh store's migration chatter; bound each HTTP request."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a local sqlite store (no-op for other stores)."""
    db = sqlite_db_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def client_for(uri: str) -> Any:
    """An MlflowClient on ``uri`` (a sqlite path made absolute)."""
    quiet_mlflow()
    from mlflow import MlflowClient

    quiet_mlflow()
    return MlflowClient(tracking_uri=local_sqlite_uri(uri))


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (tagged as model training) when missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return str(
                client.create_experiment(
                    name,
                    artifact_location=sqlite_artifact_root(local_sqlite_uri(uri)),
                    tags={EXPERIMENT_KIND_TAG: TRAINING_KIND},
                )
            )
        except MlflowException:  # created by another job meanwhile (a server store)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return str(exp.experiment_id)


def record_run_id(run_dir: Path, run_id: str) -> None:
    """Name the MLflow run in the checkpoint run folder ``run_dir`` (rank 0, once)."""
    path = run_dir / RUN_ID_FILE
    if run_id and not path.exists():
        path.write_text(run_id + "\n")


def previous_run_id(resume: str) -> str:
    """The MLflow run id recorded beside the ``train.resume`` checkpoint ('' if none)."""
    if not resume:
        return ""
    from turnout.trainer.checkpointing.files import resolve_resume

    try:
        load_dir, _ = resolve_resume(resume)
        text = (load_dir / RUN_ID_FILE).read_text(errors="replace").strip()
    except (OSError, ValueError):
        return ""
    return text if text.isalnum() and len(text) <= 64 else ""


def _existing_run(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _run_tags(cfg: TurnoutConfig, world: int) -> dict[str, str]:
    from turnout.trainer.tracking.tracker import git_commit

    tags = {
        "world_size": str(world),
        "ep_size": str(cfg.parallel.ep_size),
        "zero_stage": str(cfg.parallel.zero_stage),
        "git_commit": git_commit(),
    }
    if cfg.train.resume:
        tags[RESUMED_FROM_TAG] = cfg.train.resume
    if cfg.train.init_from:  # the run this one's weights came from
        tags["turnout.parent"] = cfg.train.init_from
    if cfg.tracking.parent_run_id:  # MLflow's own nesting tag: a sweep's trial
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    return tags


def open_run(cfg: TurnoutConfig, world: int) -> str:
    """Open the run for ``cfg`` (see the module doc); return its id.

    Raises RunError('tracking.run_id') when ``tracking.run_id`` names a run the store
    does not have; MLflow's own errors (an unreachable server) propagate.
    """
    t = cfg.tracking
    with store_lock(t.uri):
        client = client_for(t.uri)
        exp_id = experiment_id(client, t.experiment, t.uri)
    wanted = t.run_id or previous_run_id(cfg.train.resume)
    if wanted:
        run = _existing_run(client, wanted)
        if run is None and t.run_id:
            raise RunError(f"the store {t.uri} has no run {t.run_id!r}", key="tracking.run_id")
        if run is not None:
            client.update_run(wanted, status="RUNNING")
            if cfg.train.resume:
                client.set_tag(wanted, RESUMED_FROM_TAG, cfg.train.resume)
                name = Path(cfg.train.resume).name or "checkpoint"
                client.log_text(wanted, to_yaml(cfg), f"config-resumed-{name}.yaml")
            return wanted
    run = client.create_run(exp_id, run_name=t.run_name or None, tags=_run_tags(cfg, world))
    run_id = str(run.info.run_id)
    from mlflow.entities import Param

    items = list(flatten(cfg).items())
    for i in range(0, len(items), 90):  # MLflow caps one batch at 100 params
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 90]])
    client.log_text(run_id, to_yaml(cfg), CONFIG_FILE)
    return run_id


def end_run(
    uri: str, run_id: str, status: str, timeout_s: float, tags: dict[str, str] | None = None
) -> str:
    """Mark ``run_id`` ``status`` (after setting ``tags``), waiting at most ``timeout_s``;
    '' or why it failed."""
    outcome: list[str] = [f"timed out after {timeout_s:.0f} s"]

    def _end() -> None:
        try:
            client = client_for(uri)
            for key, value in (tags or {}).items():
                client.set_tag(run_id, key, value)
            client.set_terminated(run_id, status=status)
            outcome[0] = ""
        except Exception as e:  # an unreachable store: say so, never raise here
            outcome[0] = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

    worker = threading.Thread(target=_end, name="turnout-end-run", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return outcome[0]
