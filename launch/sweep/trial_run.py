"""What one Ray Tune trial of a sweep does: a normal ``turnout train`` run, recorded.

The trial runs the same command a user would (``turnout train SOURCE OVERRIDES
--launcher torchrun``: the launcher's preflight, its MLflow run as a child of the
sweep's, the worker entry under torchrun, checkpoints) in a subprocess in the sweep's
working directory, its output in ``<trial>/train.log``. Rank 0 writes the run's result
as JSON (:data:`turnout.launch.worker.RESULT_ENV`); the trial adds it to its static
record and writes ``<trial>/record.json`` last, atomically.

Idempotent: a trial whose record exists returns it without training again (a sweep
resumed after a kill may hand Tune a trial it had not yet seen finish). A trial that was
cut short resumes from its newest complete checkpoint under ``<trial>/ckpt``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from turnout.files import write_atomic
from turnout.launch.processes import die_with_parent
from turnout.redact import redact

RECORD_FILE = "record.json"
#: Each attempt's result: ``result-1.json``, ``result-2.json``, ... (a resumed trial has
#: several; the newest attempt that trained a step gives the trial's step rate).
RESULT_PATTERN = "result-{}.json"
LOG_FILE = "train.log"


def newest_checkpoint_in(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint of any run folder under ``ckpt_dir``."""
    from turnout.trainer.resume.recovery import newest_checkpoint

    found = []
    for run_dir in sorted(ckpt_dir.glob("*/")) if ckpt_dir.is_dir() else []:
        step = newest_checkpoint(run_dir)
        if step is not None:
            found.append((step.stat().st_mtime, step))
    return max(found)[1] if found else None


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, whole or not at all."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def command(trial: dict[str, Any], folder: Path, parent_run_id: str) -> tuple[list[str], list[str]]:
    """The ``turnout train`` command line of ``trial``, and the overrides that must not be
    on it (:data:`turnout.launch.torchrun.SECRET_KEYS`: they go in the environment)."""
    from turnout.launch.torchrun import split_secret

    shown, secret = split_secret(list(trial["overrides"]))  # those go in the environment
    overrides = [
        *shown,
        f"train.ckpt_dir={folder / 'ckpt'}",
        f"tracking.run_name={trial['folder']}",
    ]
    if parent_run_id:
        overrides.append(f"tracking.parent_run_id={parent_run_id}")
    resume = newest_checkpoint_in(folder / "ckpt")
    if resume is not None:
        overrides.append(f"train.resume={resume}")
    cli = [sys.executable, "-m", "turnout.launch.cli", "train", trial["source"]]
    return [*cli, *overrides, "--launcher", "torchrun"], secret


def _training_seconds(trial: dict[str, Any], folder: Path) -> float:
    """Seconds the trial's steps take (no start-up, validation or checkpoints): all its
    tokens at the rate of its newest attempt that trained (a resumed trial counts whole;
    one resumed at its last step trained nothing itself). NaN when none did."""
    tokens = trial["train_flops"] / trial["train_flops_per_token"]
    attempts = sorted(folder.glob(RESULT_PATTERN.format("*")), key=lambda p: p.stat().st_mtime)
    for path in reversed(attempts):
        rate = json.loads(path.read_text()).get("tokens_per_s") or 0.0
        if rate > 0:
            return float(tokens / rate)
    return float("nan")


def run_trial(config: dict[str, Any]) -> dict[str, Any]:
    """The Tune trainable: train one trial (or find it trained) and report its record."""
    from ray import tune

    record = train_trial(config["trial"], Path(config["sweep_dir"]), config["parent_run_id"])
    tune.report({k: v for k, v in record.items() if isinstance(v, int | float)})
    return record


def train_trial(trial: dict[str, Any], sweep_dir: Path, parent_run_id: str) -> dict[str, Any]:
    """Train ``trial`` to its record (or read the record of an earlier attempt)."""
    from turnout.launch.torchrun import OVERRIDES_ENV
    from turnout.launch.worker import RESULT_ENV

    folder = sweep_dir / "trials" / trial["folder"]
    done = folder / RECORD_FILE
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    attempt = 1 + len(list(folder.glob(RESULT_PATTERN.format("*"))))
    result_file = folder / RESULT_PATTERN.format(attempt)
    cmd, secret = command(trial, folder, parent_run_id)
    resumed = any(item.startswith("train.resume=") for item in cmd)
    env = dict(os.environ, **{RESULT_ENV: str(result_file)})
    env[OVERRIDES_ENV] = json.dumps(secret)
    # Each rank uses the CPUs the trial holds for it, not every core of the machine.
    env.setdefault("OMP_NUM_THREADS", str(trial["threads"]))
    start = time.perf_counter()
    with open(folder / LOG_FILE, "a") as log:
        log.write(f"\n$ {redact(' '.join(cmd))}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=trial["cwd"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        code = proc.wait()
    wall = time.perf_counter() - start
    if code != 0 or not result_file.is_file():
        raise RuntimeError(
            f"trial {trial['id']} failed (exit {code}); its log: {folder / LOG_FILE}"
        )
    res = json.loads(result_file.read_text())
    record = {
        **{k: v for k, v in trial.items() if k not in ("overrides", "cwd", "source")},
        "overrides": [redact(o) for o in trial["overrides"]],
        "val_loss": res.get("final_val_loss"),
        "val_bpb": res.get("final_val_bpb"),
        "val_loss_causal": res.get("final_val_loss_causal"),
        "depth_mean": res.get("final_depth_mean"),
        "train_loss": res.get("final_train_loss"),
        "tokens_per_s": res.get("tokens_per_s"),
        "wall_s": _training_seconds(trial, folder),
        "process_wall_s": wall,
        "run_id": res.get("run_id", ""),
        "resumed": resumed,
        "status": "done",
    }
    write_json(done, record)
    return record
