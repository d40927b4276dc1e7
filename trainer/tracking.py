"""MLflow tracking, rank 0 only: one run per job, params, config artifact, tags, metrics.

``Tracker`` is a no-op on ranks other than 0 and when ``tracking.enabled`` is false;
MLflow is imported lazily, so a disabled tracker has no MLflow import side effects.
A local ``sqlite:///...`` store keeps its artifacts beside the database
(``<db dir>/mlartifacts``) rather than in the working directory, and the alembic
migration chatter of a fresh store is silenced.
"""

from __future__ import annotations

import logging
import math
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Any

from turnout.config import TurnoutConfig
from turnout.config.load import flatten, to_yaml
from turnout.trainer.tracking_uri import local_sqlite_uri, sqlite_artifact_root, sqlite_db_path

_NOISY_LOGGERS = ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils")


def git_commit(path: Path | None = None) -> str:
    """HEAD of the git checkout holding the turnout sources (or ``path``), else 'unknown'."""
    if path is None:
        path = Path(str(resources.files("turnout.trainer")))
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _quiet() -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """MLflow on rank 0 (no-op elsewhere or when disabled)."""

    def __init__(self, cfg: TurnoutConfig, rank: int, world_size: int) -> None:
        self.active = bool(cfg.tracking.enabled) and rank == 0
        self.run_id = ""
        self._mlflow: Any = None
        if not self.active:
            return
        _quiet()
        import mlflow

        _quiet()
        self._mlflow = mlflow
        t = cfg.tracking
        uri = local_sqlite_uri(t.uri)
        db = sqlite_db_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(t.experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(
                    t.experiment, artifact_location=sqlite_artifact_root(uri)
                )
            except mlflow.exceptions.MlflowException:
                # Created concurrently by another job: use theirs.
                theirs = client.get_experiment_by_name(t.experiment)
                if theirs is None:
                    raise
                exp_id = theirs.experiment_id
        else:
            exp_id = exp.experiment_id
        tags = {
            "world_size": str(world_size),
            "ep_size": str(cfg.parallel.ep_size),
            "zero_stage": str(cfg.parallel.zero_stage),
            "git_commit": git_commit(),
        }
        if cfg.train.init_from:  # the run this one's weights came from
            tags["turnout.parent"] = cfg.train.init_from
        run = client.create_run(exp_id, run_name=t.run_name or None, tags=tags)
        self.run_id = run.info.run_id
        self._client = client
        params = flatten(cfg)
        items = list(params.items())
        from mlflow.entities import Param

        for i in range(0, len(items), 90):  # MLflow caps one batch at 100 params
            client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 90]])
        client.log_text(self.run_id, to_yaml(cfg), "config.yaml")

    def log_corpus(self, params: dict[str, str], corpora: dict[str, tuple[str, str]]) -> None:
        """Data params (tokenizer, fingerprint, token counts) and each corpus as an MLflow
        dataset input: ``corpora`` maps a context ('training', 'validation') to the
        corpus's (source, fingerprint)."""
        if not self.active:
            return
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag, Param

        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        inputs = [
            DatasetInput(
                Dataset(
                    name=Path(source).name or source,
                    digest=digest,
                    source_type="local",
                    source=json.dumps({"uri": source}),
                ),
                tags=[InputTag("mlflow.data.context", context)],
            )
            for context, (source, digest) in corpora.items()
        ]
        self._client.log_inputs(self.run_id, datasets=inputs)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))
        ]
        for i in range(0, len(batch), 900):
            self._client.log_batch(self.run_id, metrics=batch[i : i + 900])

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A step-indexed image (an RGB ``uint8`` array): MLflow shows one per step."""
        if not self.active:
            return
        self._client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        self._client.set_terminated(self.run_id, status=status)
        self.active = False
