"""An outage's fallback file replayed into a real MLflow store (sqlite), and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from turnout.errors import ConfigError, RunError
from turnout.launch.cli import main
from turnout.trainer.tracking.queue import Outbox
from turnout.trainer.tracking.store import client_for


def _down(record: dict) -> None:
    raise ConnectionError("store down")


def _spilled_file(tmp_path: Path, run_id: str) -> Path:
    """The real path: an Outbox whose store never answers spills at close."""
    path = tmp_path / "pending" / f"{run_id}.jsonl"
    box = Outbox(_down, path, lambda _: None)
    for step in (1, 2, 3):
        box.put(
            {
                "kind": "metrics",
                "run_id": run_id,
                "metrics": [["loss", 3.0 - step, 1000 + step, step]],
            }
        )
    box.put({"kind": "tags", "run_id": run_id, "tags": {"checkpoint/latest_step": "3"}})
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    box.put({"kind": "image", "run_id": run_id, "key": "load", "step": 3, "pixels": image.tolist()})
    box.put({"kind": "status", "run_id": run_id, "status": "FINISHED"})
    assert not box.close(timeout_s=0.2)
    return path


def test_replay_sends_every_record_in_order(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    run_id = client.create_run(client.create_experiment("replay")).info.run_id
    path = _spilled_file(tmp_path, run_id)
    assert len(path.read_text().splitlines()) == 6

    assert main(["replay-tracking", str(path), "--uri", uri]) == 0
    assert f"sent 6 tracking record(s) of run(s) {run_id}" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 2.0),
        (2, 1.0),
        (3, 0.0),
    ]
    assert run.data.tags["checkpoint/latest_step"] == "3"
    assert run.info.status == "FINISHED"
    assert not path.exists() and path.with_name(path.name + ".replayed").is_file()
    # The file is gone: a second replay is refused, it does not send twice.
    assert main(["replay-tracking", str(path), "--uri", uri]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_failed_replay_keeps_only_the_unsent_records(tmp_path: Path) -> None:
    from turnout.trainer.tracking.records import replay

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    run_id = client.create_run(client.create_experiment("replay")).info.run_id
    path = _spilled_file(tmp_path, run_id)
    lines = path.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["run_id"] = "0" * 32  # a run the store does not have: the third record fails
    path.write_text("\n".join([*lines[:2], json.dumps(bad), *lines[3:]]) + "\n")
    with pytest.raises(RunError, match="sent 2 of 6 records"):
        replay(path, uri)
    assert len(path.read_text().splitlines()) == 4  # the two sent ones are not resent
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]


def test_a_file_that_is_not_tracking_records_is_named(tmp_path: Path) -> None:
    from turnout.trainer.tracking.records import read_records

    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"kind": "metrics", "run_id": "a", "metrics": []}\n\xff\xfe\n')
    with pytest.raises(ConfigError, match=r"x\.jsonl:2: not a turnout tracking record"):
        read_records(path)
