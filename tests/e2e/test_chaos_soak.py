"""A chaos soak: one training run through Ray meets, at seeded steps, a SIGKILLed worker,
a SIGTERMed driver (re-run with ``train.resume=auto``) and a full disk (freed, re-run
again); it must end exactly where the same run never interrupted ends.

The scenario is tests/e2e/soak_scenario.py, run inside a private user and mount
namespace (``unshare -Urm``) whose checkpoint folder is a 64 MiB tmpfs: the run keeps
the newest 2 checkpoints of ~11 MB, and the fill leaves 2 MiB, room for the run
folder's records but not for a checkpoint. Then:

- the killed worker is restarted by Ray from the newest checkpoint before the kill, and
  the run goes on (the restart and the steps trained again are in the MLflow run);
- the SIGTERM stops it with exit 143 and one line naming the checkpoint;
- the full disk stops the resumed job with exit 1 and one line saying so, not
  retried, and the checkpoint before it stays the one to resume;
- the last job finishes; its final parameters equal the uninterrupted run's bit for
  bit (CPU, fp32, same seed) and the one MLflow run holds every step's loss once.

``TURNOUT_SOAK_SEED`` draws another schedule (default 7). Skipped where the machine
allows no user namespaces or no tmpfs in one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.soak_scenario import CKPT_EVERY
from tests.jobs import STEPS, assert_same_params, summary_value

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCENARIO = Path(__file__).with_name("soak_scenario.py")
TMPFS_SIZE = "64m"


def test_a_run_through_kills_stops_and_a_full_disk_ends_as_if_uninterrupted(
    tmp_path: Path, uninterrupted: str
) -> None:
    from mlflow import MlflowClient

    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) here")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    seed = int(os.environ.get("TURNOUT_SOAK_SEED", "7"))
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"cwd": str(tmp_path), "mnt": str(mnt), "seed": seed}))
    script = (
        f"mount -t tmpfs -o size={TMPFS_SIZE} tmpfs {mnt} || exit 77; "
        f'exec {sys.executable} {SCENARIO} "$0"'
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [unshare, "-Urm", "sh", "-c", script, str(settings)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode == 77 or "unshare failed" in proc.stderr:
        pytest.skip(f"no tmpfs in a user namespace here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    (tmp_path / "soak.json").write_text(proc.stdout)  # kept for a failing run's reader
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    events = {e["event"]: e for e in result["events"]}
    killed, filled, last = result["jobs"]
    print(f"\nsoak (seed {seed}):")
    for e in result["events"]:
        print(f"  {e['event']:<20} after step {e['after_step']}")
    for job in result["jobs"]:
        print(f"  job {job['name']!r}: exit {job['code']}; {job['lines']}")

    # 1, 2: the worker's death was a restart from the newest checkpoint before it (some
    # steps to train again); the SIGTERM a checkpoint and exit 143.
    restart = re.search(
        r"turnout: restart 1: a worker failed after step (\d+); resumed from \S+ "
        r"\(step (\d+)\), (\d+) step\(s\) to train again",
        killed["out"],
    )
    assert restart, killed["out"]
    failed_at, from_step, redone = (int(g) for g in restart.groups())
    assert failed_at >= events["SIGKILL a worker"]["after_step"]
    assert from_step % CKPT_EVERY == 0 and redone == failed_at - from_step
    assert from_step >= (events["SIGKILL a worker"]["after_step"] // CKPT_EVERY) * CKPT_EVERY
    assert killed["code"] == 143, killed
    (line,) = killed["lines"]
    assert line.startswith("turnout: terminated (SIGTERM): "), line
    m = re.search(r"stopped after step (\d+) and saved", line)
    assert m, line
    term_step = int(m.group(1))
    assert term_step >= events["SIGTERM the driver"]["after_step"]

    # 3: resumed where it stopped; the full disk is one line, and not retried.
    assert f"/step{term_step} " in filled["out"], filled["out"]  # resume=auto's line
    assert filled["code"] == 1, filled
    errors = [ln for ln in filled["lines"] if ln.startswith("turnout: error:")]
    assert len(errors) == 1, filled["lines"]
    assert "no space left on device" in errors[0].lower(), errors[0]
    assert "turnout: restart" not in filled["out"]

    # 4: resumed from the newest checkpoint that was whole, and finished.
    assert last["code"] == 0, last
    assert "turnout: train.resume=auto: resuming " in last["out"]
    assert summary_value(last["out"], "steps") == str(STEPS)
    assert_same_params(result["final"], uninterrupted)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("soak").experiment_id])
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))  # each step once
    # The restart is on record where it happened: at the step it resumed from.
    restarts = client.get_metric_history(run.info.run_id, "restarts")
    assert [(m.step, m.value) for m in restarts] == [(from_step, 1.0)]
    steps_redone = client.get_metric_history(run.info.run_id, "steps_redone")
    assert [(m.step, m.value) for m in steps_redone] == [(from_step, float(redone))]
