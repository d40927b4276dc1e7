"""``turnout sweep``: a two-trial sweep through Ray Tune, killed mid-trial and resumed.

The sweep is started as a user starts it (its own session, an embedded Ray cluster) and
SIGKILLed, with its whole process group, once the first trial has finished and the
second has written a checkpoint. Then:

- nothing of the sweep keeps training (a trial's ``turnout train`` dies with the Tune
  worker that ran it);
- the same command again finishes the sweep: the first trial is not trained again, the
  second resumes from its checkpoint (its MLflow child run is reopened, not duplicated);
- ``results.json`` holds both records; the MLflow parent run is FINISHED with the two
  trials as FINISHED children.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = """\
name: two
source: tiny
dir: {dir}
max_concurrent: 1
overrides:
  - model.d_model=32
  - model.n_layers=2
  - model.n_heads=2
  - model.ffn_dim=64
  - model.max_seq_len=32
  - model.moe.expert_ffn_dim=32
  - parallel.ep_size=1
  - parallel.zero_stage=0
  - data.max_bytes=200000
  - train.micro_batch_size=2
  - train.warmup_steps=2
  - train.eval_every=0
  - train.eval_batches=2
  - train.log_every=5
  - train.ckpt_every=5
  - launch.num_workers=1
  - tracking.uri=sqlite:///{db}
  - tracking.system_metrics=false
grids:
  - name: short
    budgets: [1.5e9]
    axes:
      family:
        dense: ['model.layer_pattern=[dense]']
  - name: long  # long enough that the kill lands mid-training (~215 steps; killed at ~5)
    budgets: [3.0e9]
    axes:
      family:
        moe: ['model.layer_pattern=[moe]']
"""
#: Generous bounds on 2 shared cores: a trial of ~100-215 tiny steps takes ~30-60 s.
TRIAL_WITHIN_S = 400.0
GONE_WITHIN_S = 60.0


def _sweep(tmp_path: Path, spec: Path) -> subprocess.Popen:
    exe = str(Path(sys.executable).with_name("turnout"))
    return subprocess.Popen(
        [exe, "sweep", str(spec)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(what: str, check, proc: subprocess.Popen, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before {what}:\n{out[-3000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no {what} within {timeout:.0f} s")


def _trainers(folder: Path) -> list[psutil.Process]:
    """Live processes training a trial of the sweep in ``folder``."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"train.ckpt_dir={folder}" in cmd:
            out.append(p)
    return out


def test_a_killed_sweep_resumes_from_its_finished_trials(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    spec = tmp_path / "two.yaml"
    spec.write_text(SPEC.format(dir=tmp_path / "sweeps", db=db))
    folder = tmp_path / "sweeps" / "two"
    first = folder / "trials" / "family=dense__b1.5e+09__s0"
    second = folder / "trials" / "family=moe__b3e+09__s0"

    proc = _sweep(tmp_path, spec)
    _wait_for("first trial's record", (first / "record.json").is_file, proc, TRIAL_WITHIN_S)
    _wait_for(
        "checkpoint of the second trial",
        lambda: any((second / "ckpt").glob("*/step*/manifest.json")),
        proc,
        TRIAL_WITHIN_S,
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + GONE_WITHIN_S
    while _trainers(folder) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _trainers(folder)
    assert not left, f"still training after the sweep was killed: {[p.pid for p in left]}"
    assert not (second / "record.json").exists()
    total = {t["id"]: t["steps"] for t in json.loads((folder / "trials.json").read_text())}
    steps = [int(p.name[4:]) for p in (second / "ckpt").glob("*/step*")]
    # Killed a few steps after its first checkpoint: it must not have trained to its end.
    assert max(steps) < total["family=moe|b3e+09|s0"], f"trained on after the kill: {steps}"
    first_record = (first / "record.json").stat().st_mtime_ns

    again = _sweep(tmp_path, spec)
    out, _ = again.communicate(timeout=TRIAL_WITHIN_S)
    assert again.returncode == 0, out[-3000:]
    assert "2 of 2 trial(s) finished" in out
    assert (first / "record.json").stat().st_mtime_ns == first_record  # not trained again
    assert (first / "train.log").read_text().count("\n$ ") == 1
    runs = (second / "train.log").read_text().split("\n$ ")[1:]
    assert len(runs) == 2 and "train.resume=" in runs[1].splitlines()[0]

    records = json.loads((folder / "results.json").read_text())
    assert [r["id"] for r in records] == ["family=dense|b1.5e+09|s0", "family=moe|b3e+09|s0"]
    assert all(r["status"] == "done" and r["val_loss"] > 0 for r in records), records
    assert records[1]["resumed"] is True
    assert all(r["wall_s"] > 0 and r["process_wall_s"] > 0 for r in records)

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    parent_id = (folder / "mlflow_parent_run_id").read_text().strip()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert sorted(r.info.run_id for r in children) == sorted(r["run_id"] for r in records)
    assert all(r.info.status == "FINISHED" for r in children)
