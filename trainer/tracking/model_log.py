"""The model out to MLflow: a run's weights as an MLflow 3 logged model that serves text.

:func:`log_folder` logs an export folder (``turnout export``: ``model.safetensors``,
``config.yaml``, ``tokenizer.json``) or a checkpoint step folder as a logged model of the
run: pyfunc flavour :class:`~turnout.trainer.tracking.pyfunc_model.TextGenerator`, the
run's params, and the run's metrics at the model's step linked to it (MLflow links the
source run's metrics of ``step``: the final loss, val loss and FLOP accounting of a run
that ends there). Optionally it registers the model (``tracking.register_as``).

Copied or by reference: a model whose weights take at most ``tracking.log_model_max_mb``
MiB is copied into the artifact store (an export folder written for it); a larger one is
logged by reference: the logged model holds its MLmodel, environment and the folder's
path (model config ``source``), not the weights, and loads only while that folder
exists. The line printed says which.

:func:`log_run_model` is the end of a training run (rank 0, after the final
checkpoint, once the tracker's queue is drained): a failure there costs one warning
line, never the run. ``turnout export --mlflow`` calls :func:`log_folder` directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from turnout.config import TurnoutConfig
from turnout.models.params import count_params
from turnout.trainer.tracking.store import client_for
from turnout.trainer.tracking.uri import local_sqlite_uri

#: The logged model's name (and default pyfunc model type).
MODEL_NAME = "turnout-lm"
#: Logged-model tag: 'copied' or 'reference'.
WEIGHTS_TAG = "turnout.weights"
#: Logged-model tag: the folder the weights came from.
SOURCE_TAG = "turnout.source"
#: What the serving environment needs (recorded in requirements.txt; the supported
#: serving is ``--env-manager local`` in the environment turnout is installed in).
_REQUIREMENTS = ("turnout", "torch", "mlflow", "tokenizers", "safetensors", "omegaconf", "pyyaml")
_BYTES_PER_MIB = 2**20


@dataclass(frozen=True)
class LoggedModel:
    model_id: str
    uri: str
    """``models:/<model_id>``."""
    copied: bool
    """Whether the weights were copied into the artifact store (else by reference)."""
    size_mb: float
    """The weights' size in MiB (of the file, or estimated from the config)."""
    source: Path
    """The folder copied, or referenced."""
    registered: str = ""
    """``models:/<name>/<version>`` when registered, else ''."""

    def line(self, run_id: str, max_mb: float) -> str:
        """One line for the log: where the model is, copied or by reference, registered."""
        if self.copied:
            how = f"{self.size_mb:,.1f} MiB of weights copied into the artifact store"
        else:
            how = (
                f"by reference to {self.source}: {self.size_mb:,.1f} MiB > "
                f"tracking.log_model_max_mb={max_mb:g}, not copied; it loads only while "
                "that folder exists"
            )
        reg = f", registered as {self.registered}" if self.registered else ""
        return f"turnout: logged model {self.uri} to MLflow run {run_id} ({how}){reg}"


def requirements() -> list[str]:
    """Pinned requirements of the serving environment (the installed versions)."""
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def estimated_mb(cfg: TurnoutConfig, bytes_per_weight: int) -> float:
    """MiB of the whole model's weights (tied head once) at ``bytes_per_weight``."""
    return count_params(cfg.model).total * bytes_per_weight / _BYTES_PER_MIB


#: MLflow's advice about type hints and input examples (see :func:`_quiet_mlflow`).
_ADVICE = re.compile(r"type hint|input example", re.IGNORECASE)


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's advice while it logs our model, which a run's output should not carry: type
    hints and input examples (the model has an explicit signature instead; an example would
    be run while logging), the CloudPickle caution (the pickled object is our own class,
    its code is turnout), and the artifact download progress bar."""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # restores showwarning on the way out
            # A filter cannot drop these: MLflow wraps its checks in its own
            # catch_warnings with simplefilter("once") in front of ours. What reaches the
            # display is dropped there instead; every other warning still shows.
            show = warnings.showwarning

            def drop_advice(message: Any, category: Any, *args: Any, **kw: Any) -> None:
                if not _ADVICE.search(str(message)):
                    show(message, category, *args, **kw)

            warnings.showwarning = drop_advice
            yield
    finally:
        pyfunc_log.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def log_folder(
    uri: str,
    run_id: str,
    folder: Path,
    step: int,
    copy: bool,
    size_mb: float,
    register_as: str = "",
    origin: Path | None = None,
) -> LoggedModel:
    """Log ``folder`` (an export folder when ``copy``; an export or checkpoint step
    folder by reference otherwise) as a logged model of run ``run_id`` at ``step``.
    ``origin``: the folder the weights came from (default ``folder``), tagged and named
    in :attr:`LoggedModel.source`."""
    import mlflow
    from mlflow.models import Model

    folder = folder.resolve()
    origin = (origin or folder).resolve()
    store = local_sqlite_uri(uri)
    client = client_for(store)
    mlflow.set_tracking_uri(store)  # Model.log resolves its client from the global URI
    run = client.get_run(run_id)
    tags = {WEIGHTS_TAG: "copied" if copy else "reference", SOURCE_TAG: str(origin)}
    created = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=MODEL_NAME,
        source_run_id=run_id,
        tags=tags,
        params=dict(run.data.params),
    )
    with _quiet_mlflow():
        from turnout.trainer.tracking import pyfunc_model

        where: dict[str, Any] = (
            {"artifacts": {pyfunc_model.ARTIFACT: str(folder)}}
            if copy
            else {"model_config": {pyfunc_model.SOURCE_KEY: str(folder)}}
        )
        info = Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=created.model_id,
            step=step,
            python_model=pyfunc_model.TextGenerator(),
            signature=pyfunc_model.signature(),
            pip_requirements=requirements(),
            registered_model_name=register_as or None,
            **where,
        )
    registered = ""
    if register_as and info.registered_model_version is not None:
        registered = f"models:/{register_as}/{info.registered_model_version}"
    return LoggedModel(
        created.model_id, f"models:/{created.model_id}", copy, size_mb, origin, registered
    )


def _weight_bytes(folder: Path) -> int:
    """Bytes per weight the checkpoint step ``folder`` saved (its forward's dtype)."""
    from turnout.trainer.checkpointing.files import read_meta

    name = str(read_meta(folder).get("weight_dtype", "float32"))
    return 2 if name in ("bfloat16", "float16") else 4


def log_run_model(cfg: TurnoutConfig, run_id: str, checkpoint: str, step: int) -> str:
    """The end of a run: log ``checkpoint`` (the final step folder) as the run's model
    (see the module docstring); return its ``models:/`` URI, '' after a warning line."""
    t = cfg.tracking
    folder = Path(checkpoint)
    try:
        size_mb = estimated_mb(cfg, _weight_bytes(folder))
        copy = size_mb <= t.log_model_max_mb
        with tempfile.TemporaryDirectory(prefix="turnout-model-") as tmp:
            source = folder
            if copy:
                from turnout.trainer.weights.export import export

                source = export(folder, Path(tmp) / "model").folder
            logged = log_folder(
                t.uri, run_id, source, step, copy, size_mb, t.register_as, origin=folder
            )
    except Exception as e:  # a store that refuses us: the run's result stands
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(
            f"turnout: warning: could not log the model of {folder} to MLflow run {run_id} "
            f"(tracking.log_model): {type(e).__name__}: {first}",
            file=sys.stderr,
            flush=True,
        )
        return ""
    print(logged.line(run_id, t.log_model_max_mb), file=sys.stderr, flush=True)
    return logged.uri
