"""Tracking records into an MLflow store: the one place a record becomes MLflow calls.

A record is the JSON-able dict the training loop queues (:mod:`turnout.trainer.tracking.tracker`)
and the :class:`~turnout.trainer.tracking.queue.Outbox` sends, or writes to its fallback
file when the store stays unreachable. :func:`deliver` sends one; :func:`replay` sends a
fallback file's records later (``turnout replay-tracking FILE``).

Kinds: ``metrics`` (rows of ``[key, value, timestamp ms, step]``), ``tags``, ``corpus``
(params and dataset inputs), ``image`` (RGB ``uint8`` pixels as nested lists, one per
step) and ``status`` (the run's terminal status). Each carries its ``run_id``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turnout.errors import ConfigError, RunError
from turnout.files import write_atomic
from turnout.trainer.tracking.queue import Record

KINDS = ("metrics", "tags", "corpus", "image", "status")


def deliver(client: Any, record: Record) -> None:
    """Send one record through the MlflowClient ``client`` (raises what MLflow raises)."""
    from mlflow.entities import Metric, RunTag

    kind, run_id = record["kind"], record["run_id"]
    if kind == "metrics":
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
        client.log_batch(run_id, metrics=metrics)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif kind == "corpus":
        _deliver_corpus(client, run_id, record["params"], record["corpora"])
    elif kind == "image":
        import numpy as np

        pixels = np.asarray(record["pixels"], dtype=np.uint8)
        client.log_image(run_id, pixels, key=record["key"], step=record["step"], synchronous=True)
    elif kind == "status":
        client.set_terminated(run_id, status=record["status"])
    else:
        raise ValueError(f"unknown tracking record {kind!r}")


def _deliver_corpus(
    client: Any, run_id: str, params: dict[str, str], corpora: dict[str, list[str]]
) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag, Param

    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
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
    client.log_inputs(run_id, datasets=inputs)


def read_records(path: Path) -> list[Record]:
    """The records of a fallback file; ConfigError naming the file and line if one is bad."""
    if not path.is_file():
        raise ConfigError(str(path), "does not exist")
    records: list[Record] = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                ok = isinstance(record, dict) and record.get("kind") in KINDS
                ok = ok and isinstance(record.get("run_id"), str)
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = False
            if not ok:
                raise ConfigError(f"{path}:{n}", "not a turnout tracking record")
            records.append(record)
    return records


@dataclass(frozen=True)
class Replayed:
    records: int
    run_ids: tuple[str, ...]
    done_file: Path
    """Where the replayed file was moved (``<file>.replayed``)."""


def replay(path: str | os.PathLike, uri: str) -> Replayed:
    """Send every record of the fallback file ``path`` to the store at ``uri``, in order.

    On success the file is renamed ``<file>.replayed`` (a second replay finds nothing to
    resend). If the store fails part-way, the file is rewritten with the records not yet
    sent (so a retry sends nothing twice) and RunError names how far it got."""
    from turnout.trainer.tracking.store import client_for

    src = Path(path)
    records = read_records(src)
    client = client_for(uri)
    for i, record in enumerate(records):
        try:
            deliver(client, record)
        except Exception as e:  # noqa: BLE001 - keep what is unsent, then one line
            _rewrite(src, records[i:])
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise RunError(
                f"sent {i} of {len(records)} records of {src} to {uri}, then: {first}; "
                f"the other {len(records) - i} stay in the file (run the command again)"
            ) from None
    done = src.with_name(src.name + ".replayed")
    os.replace(src, done)
    return Replayed(len(records), tuple(dict.fromkeys(r["run_id"] for r in records)), done)


def _rewrite(path: Path, records: list[Record]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
