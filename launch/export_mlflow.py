"""``turnout export CKPT OUT --mlflow``: the export folder as a logged model of a run.

The run is the one that wrote the checkpoint (the run folder's ``mlflow_run_id``) when
the store has it; otherwise (tracking was off, another store, an imported model) a new
run is opened in the checkpoint's ``tracking.experiment``, holding its config, and
ended FINISHED. The store is ``--tracking-uri`` or the checkpoint's ``tracking.uri`` (a
relative sqlite path is resolved against the working folder). Copied into the artifact
store when ``model.safetensors`` takes at most the checkpoint's
``tracking.log_model_max_mb`` MiB, by reference to ``OUT`` otherwise
(:mod:`turnout.trainer.tracking.model_log`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from turnout.config.train import check_model_name
from turnout.errors import ConfigError, RunError
from turnout.models.pretrained import WEIGHTS_FILE, export_config
from turnout.trainer.tracking.uri import absolute_tracking_uri, check_tracking_uri

_MIB = 2**20


def check_flags(fmt: str, uri: str | None, register_as: str | None) -> None:
    """The --mlflow flags, checked before anything is exported."""
    if fmt != "turnout":
        raise ConfigError("--mlflow", "logs the turnout format; drop --format hf")
    if uri is not None:
        try:
            check_tracking_uri(uri)
        except ConfigError as e:
            raise ConfigError("--tracking-uri", e.message) from None
    if register_as is not None:
        check_model_name(register_as, "--register-as")


def _run_for(checkpoint: str, uri: str, out: Path, step: int) -> tuple[str, bool]:
    """(run id, whether it was opened here) of the run the export is logged to."""
    from mlflow.exceptions import MlflowException

    from turnout.trainer.tracking.store import client_for, open_run, previous_run_id

    recorded = previous_run_id(checkpoint)
    if recorded:
        try:
            client_for(uri).get_run(recorded)
            return recorded, False
        except MlflowException:
            pass  # the checkpoint's run lives in another store
    cfg = export_config(out, "OUT")
    name = f"export {Path(checkpoint).resolve().name} step {step}"
    tracking = replace(cfg.tracking, uri=uri, run_id="", run_name=name, parent_run_id="")
    cfg = replace(cfg, tracking=tracking, train=replace(cfg.train, resume=""))
    return open_run(cfg, 1), True


def log_export(
    checkpoint: str, out: Path, step: int, uri: str | None, register_as: str | None
) -> str:
    """Log the export folder ``out`` to MLflow; return the line saying what was logged."""
    from turnout.trainer.tracking.model_log import log_folder
    from turnout.trainer.tracking.store import end_run

    cfg = export_config(out, "OUT")
    store = absolute_tracking_uri(uri or cfg.tracking.uri)
    max_mb = cfg.tracking.log_model_max_mb
    size_mb = (out / WEIGHTS_FILE).stat().st_size / _MIB
    copy = size_mb <= max_mb
    run_id, opened = "", False
    try:
        run_id, opened = _run_for(checkpoint, store, out, step)
        logged = log_folder(store, run_id, out, step, copy, size_mb, register_as or "")
    except Exception as e:  # an unreachable store, a registry that refuses the name
        if opened:
            end_run(store, run_id, "FAILED", 15.0)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RunError(f"cannot log to the MLflow store {store}: {first}", "--mlflow") from None
    if opened:
        end_run(store, run_id, "FINISHED", 15.0)
    return logged.line(run_id, max_mb)
