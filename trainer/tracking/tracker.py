"""MLflow tracking, rank 0 only: one run per job, params, config artifact, tags, metrics.

``Tracker`` is a no-op on ranks other than 0 and when ``tracking.enabled`` is false;
MLflow is imported lazily, so a disabled tracker has no MLflow import side effects.
A local ``sqlite:///...`` store keeps its artifacts beside the database
(``<db dir>/mlartifacts``) rather than in the working directory.

Opening and ending the run is :mod:`turnout.trainer.tracking.store` (the owner of the
run, the launcher or rank 0, does both). Every write from the training loop (metrics,
checkpoint tags, the final status) goes through an :class:`Outbox`: the loop never
waits on the store, an outage costs one warning line, and what the store did not take
within ``tracking.flush_timeout_s`` at the end lands in a local JSON-lines file.

A run carried on by another attempt (a restart, a resumed job) holds each step of its
training series (loss, lr, val_loss, ...: ``log_metrics(..., once=True)``) once: the
tracker reads, when it starts, the newest step the store already has of every metric
key, and drops this attempt's values of the steps at or before it, which it trains
again (bit-equal on CPU, so the values dropped are the values kept). The outbox
delivers in order, so what a killed attempt queued but never sent is past that step
and is logged again. What each attempt measures of itself (its probed peak, its
restarts, its end-of-run totals) is always logged.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from turnout.config import TurnoutConfig
from turnout.redact import redact
from turnout.trainer.tracking.queue import Outbox, Record
from turnout.trainer.tracking.records import deliver
from turnout.trainer.tracking.store import client_for, open_run

#: MLflow takes at most 1000 metrics in one log_batch.
_METRICS_PER_BATCH = 900


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


def fallback_file(run_id: str) -> Path:
    """Where tracking records the store did not take are written (JSON lines)."""
    return Path(".turnout", "mlflow-pending", f"{run_id}.jsonl").resolve()


def logged_through(client: Any, run_id: str) -> dict[str, int]:
    """The newest step the store has of each metric of ``run_id`` (empty for a new run).

    MLflow keeps each key's latest value by step; ``get_run`` returns them, with their
    steps in the run's proto form (``RunData.metrics`` holds the values only).
    """
    data = client.get_run(run_id).to_proto().data
    return {m.key: int(m.step) for m in data.metrics}


def _warn(line: str) -> None:
    """A warning on stderr, secrets left out (an MLflow error may quote the store's URL).
    Through ``tqdm.write``: while the training bar is drawn, the warning gets a line of
    its own instead of being glued to a progress segment."""
    tqdm.write(redact(line), file=sys.stderr)
    sys.stderr.flush()


class Tracker:
    """MLflow on rank 0 (no-op elsewhere or when disabled).

    By default the run is opened here (a new one, or ``tracking.run_id`` / the resumed
    checkpoint's run reopened) and ended in :meth:`finish`. ``attach_to``: the id of a
    run the launcher opened; it is only logged to, its status left to the launcher.
    """

    def __init__(self, cfg: TurnoutConfig, rank: int, world_size: int, attach_to: str = "") -> None:
        self.active = bool(cfg.tracking.enabled) and rank == 0
        self.run_id = ""
        self.owns_run = not attach_to
        self._mlflow: Any = None
        self._flush_timeout_s = float(cfg.tracking.flush_timeout_s)
        if not self.active:
            return
        import mlflow

        self._mlflow = mlflow
        t = cfg.tracking
        self._client = client_for(t.uri)
        if attach_to:
            self.run_id = str(self._client.get_run(attach_to).info.run_id)
        else:
            self.run_id = open_run(cfg, world_size)
        self._logged = logged_through(self._client, self.run_id)
        self._outbox = Outbox(self._deliver, fallback_file(self.run_id), _warn)

    def _deliver(self, record: Record) -> None:
        """Send one outbox record to the store (runs on the outbox thread)."""
        deliver(self._client, record)

    def log_corpus(self, params: dict[str, str], corpora: dict[str, tuple[str, str]]) -> None:
        """Queue the data params (tokenizer, fingerprint, token counts) and each corpus as
        an MLflow dataset input: ``corpora`` maps a context ('training', 'validation') to
        the corpus's (source, fingerprint). Never blocks."""
        if self.active:
            record = {"kind": "corpus", "run_id": self.run_id, "params": dict(params)}
            record["corpora"] = {k: list(v) for k, v in corpora.items()}
            self._outbox.put(record)

    def log_metrics(self, metrics: dict[str, float], step: int, *, once: bool = False) -> None:
        """Queue ``metrics`` at ``step`` (non-finite values left out); never blocks.
        ``once``: values of the training's step series, left out where an earlier
        attempt of the run already logged this step of the key (see the module doc)."""
        if not self.active or not metrics:
            return
        now = int(time.time() * 1000)
        rows = [
            [k, float(v), now, int(step)]
            for k, v in metrics.items()
            if math.isfinite(float(v)) and not (once and step <= self._logged.get(k, -1))
        ]
        for i in range(0, len(rows), _METRICS_PER_BATCH):
            self._outbox.put(
                {
                    "kind": "metrics",
                    "run_id": self.run_id,
                    "metrics": rows[i : i + _METRICS_PER_BATCH],
                }
            )

    def set_tags(self, tags: dict[str, str]) -> None:
        """Queue run tags; never blocks."""
        if self.active and tags:
            self._outbox.put({"kind": "tags", "run_id": self.run_id, "tags": dict(tags)})

    def log_checkpoint(self, folder: str, step: int, pruned: Sequence[str] = ()) -> None:
        """Record a saved checkpoint in the run: its path and step as tags (no upload).
        ``pruned``: the step folders beside it that retention just deleted; their tags
        say so (``pruned: <path>``) instead of naming a folder that is gone."""
        parent = Path(folder).parent
        tags = {f"checkpoint/{name}": f"pruned: {parent / name}" for name in pruned}
        tags.update(
            {
                f"checkpoint/step{step}": folder,
                "checkpoint/latest": folder,
                "checkpoint/latest_step": str(step),
            }
        )
        self.set_tags(tags)

    def log_image(self, image: Any, key: str, step: int) -> None:
        """Queue a step-indexed image (an RGB ``uint8`` array; MLflow shows one per step).
        Never blocks; the record carries the pixels as nested lists, so it stays JSON."""
        if self.active:
            record = {"kind": "image", "run_id": self.run_id, "key": key, "step": int(step)}
            record["pixels"] = image.tolist()
            self._outbox.put(record)

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is queued (ending the run with ``status`` when this tracker owns it),
        waiting at most ``tracking.flush_timeout_s``; the rest goes to the fallback file."""
        if not self.active:
            return
        self.active = False
        if self.owns_run:
            self._outbox.put({"kind": "status", "run_id": self.run_id, "status": status})
        if not self._outbox.close(self._flush_timeout_s):
            _warn(
                f"turnout: warning: {self._outbox.spilled} tracking record(s) of MLflow run "
                f"{self.run_id} were not sent within tracking.flush_timeout_s="
                f"{self._flush_timeout_s:g} s; they are in {self._outbox.fallback}"
            )
