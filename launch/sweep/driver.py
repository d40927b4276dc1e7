"""``turnout sweep SPEC.yaml``: every trial of a spec, scheduled by Ray Tune, resumable.

Before any trial starts, on the launcher: the spec and every trial's config are checked
(one line naming the key), each distinct corpus is tokenized once, and the sweep's
folder ``<dir>/<name>/`` gets the spec and the trial list. Then Ray (an embedded local
cluster, or the one ``--address`` names) runs the trials through a Ray Tune ``Tuner``:
each trial holds ``launch.num_workers x launch.cpus_per_worker`` CPUs, so one machine
runs them one after another and a cluster side by side.

Resuming: run the same command again. Tune's experiment state lives in the sweep folder
and is restored (``Tuner.restore``) when the trial list is unchanged; every finished
trial also left ``record.json``, so a trial Tune had not yet seen finish returns at once,
and one cut short resumes from its last checkpoint. A changed spec starts a new Tune
experiment over the same trial folders (finished trials are still not trained again).

MLflow: one parent run per sweep (reopened on resume), every trial a child run. The
records of all finished trials are written to ``<sweep>/results.json``, which
``turnout sweep SPEC --report`` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from turnout.config import TurnoutConfig
from turnout.config.sweep import SweepSpec, load_spec
from turnout.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ConfigError
from turnout.launch.sweep.trial_run import RECORD_FILE, run_trial, write_json
from turnout.launch.sweep.trials import Trial, expand
from turnout.redact import redact

PARENT_FILE = "mlflow_parent_run_id"
RESULTS_FILE = "results.json"


def sweep_dir(spec: SweepSpec) -> Path:
    return (Path(spec.dir).expanduser() / spec.name).resolve()


def _configs(trials: list[Trial]) -> list[TurnoutConfig]:
    from turnout.launch.paths import resolve_paths

    return [resolve_paths(t.cfg) for t in trials]


def _check_tracking(cfgs: list[TurnoutConfig]) -> TurnoutConfig:
    """All trials log to one store and experiment (the parent run's); the first config."""
    first = cfgs[0]
    for cfg in cfgs[1:]:
        for key in ("enabled", "uri", "experiment"):
            if getattr(cfg.tracking, key) != getattr(first.tracking, key):
                raise ConfigError(f"tracking.{key}", "must be the same for every trial")
    return first


def _prepare_corpora(cfgs: list[TurnoutConfig]) -> None:
    """Tokenize each distinct corpus once, before any trial (its errors name data.*)."""
    from turnout.launch.preflight import prepare_data

    done: set[str] = set()
    for cfg in cfgs:
        key = repr((cfg.data, cfg.model.vocab_size))
        if key not in done:
            prepare_data(cfg)
            done.add(key)


def _parent_run(cfg: TurnoutConfig, spec: SweepSpec, folder: Path, spec_path: Path) -> str:
    """The sweep's MLflow parent run: reopened when the folder names one, else new."""
    if not cfg.tracking.enabled:
        return ""
    from turnout.trainer.tracking.store import client_for, experiment_id, store_lock

    t = cfg.tracking
    with store_lock(t.uri):
        client = client_for(t.uri)
        exp_id = experiment_id(client, t.experiment, t.uri)
    recorded = folder / PARENT_FILE
    if recorded.is_file():
        run_id = recorded.read_text().strip()
        try:
            client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:  # the store lost it: a new parent  # noqa: BLE001
            pass
    run = client.create_run(exp_id, run_name=spec.name, tags={"turnout.sweep": spec.name})
    run_id = str(run.info.run_id)
    client.log_text(run_id, spec_path.read_text(), "sweep.yaml")
    recorded.write_text(run_id + "\n")
    return run_id


def _trial_space(spec: SweepSpec, trials: list[Trial]) -> list[dict[str, Any]]:
    cwd = os.getcwd()
    return [{**t.record(), "folder": t.folder, "source": spec.source, "cwd": cwd} for t in trials]


def _init_ray(address: str | None, spec: SweepSpec) -> bool:
    """Start an embedded cluster or join one (token authentication checked already, in
    :func:`run_sweep`); True when we started it."""
    import logging

    import ray

    from turnout.launch.ray.auth import isolate_local_cluster, local_init_kw
    from turnout.launch.ray.cluster import check_reachable, join_cluster

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("AIR_VERBOSITY", "0")  # our bar instead of Tune's tables
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)
    quiet: dict[str, Any] = dict(logging_level=logging.ERROR, log_to_driver=False)
    if address:
        check_reachable(address)
        join_cluster(address, quiet, verbose=False)
        return False
    isolate_local_cluster()  # loopback only, a token of this sweep's own
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **local_init_kw(), **quiet)
    return True


def _tuner(space: list[dict[str, Any]], folder: Path, spec: SweepSpec, parent: str) -> Any:
    from ray import tune

    from turnout.launch.sweep.progress import SweepProgress

    digest = hashlib.sha256(json.dumps([t["id"] for t in space]).encode()).hexdigest()[:10]
    name = f"tune-{digest}"
    per_trial = max(int(t["workers"]) for t in space)
    trainable = tune.with_resources(run_trial, {"cpu": per_trial})
    path = folder / name
    if tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(
            str(path), trainable, resume_unfinished=True, restart_errored=True
        )
    return tune.Tuner(
        trainable,
        param_space={
            "trial": tune.grid_search(space),
            "sweep_dir": str(folder),
            "parent_run_id": parent,
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent or None),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(folder),
            verbose=0,
            callbacks=[SweepProgress(folder, len(space))],
        ),
    )


def collect(folder: Path, trials: list[Trial]) -> list[dict[str, Any]]:
    """The records of the spec's finished trials, in trial-id order."""
    out = []
    for t in sorted(trials, key=lambda t: t.id):
        path = folder / "trials" / t.folder / RECORD_FILE
        if path.is_file():
            out.append(json.loads(path.read_text()))
    return out


def spec_file(name: str | Path) -> Path:
    """A spec path, or the name of a spec shipped in ``configs/sweeps/`` (``isoflop``)."""
    text = str(name)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return Path(text)
    from turnout.config.load import preset_dir

    shipped = preset_dir() / "sweeps" / f"{text}.yaml"
    if not shipped.is_file():
        raise ConfigError("sweep", f"no spec file {text!r} and no shipped spec of that name")
    return shipped


def run_sweep(spec_path: str | Path, address: str | None = None) -> int:
    """Run (or resume) the sweep; exit 0 when every trial finished, 1 otherwise."""
    spec_path = spec_file(spec_path)
    spec = load_spec(spec_path)
    trials = expand(spec)
    cfgs = _configs(trials)
    first = _check_tracking(cfgs)
    if address:  # before any work: no token, no sweep (unless the spec allows it)
        from turnout.launch.ray.auth import require_token_auth
        from turnout.launch.ray.cluster import KEY

        require_token_auth(address, first.launch.allow_unauthenticated, KEY)
    _prepare_corpora(cfgs)
    folder = sweep_dir(spec)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.yaml").write_text(Path(spec_path).read_text())
    space = _trial_space(spec, trials)
    write_json(folder / "trials.json", space)
    parent = _parent_run(first, spec, folder, Path(spec_path))
    done = len(collect(folder, trials))
    print(
        f"turnout: sweep {spec.name}: {len(trials)} trial(s), {done} already finished; "
        f"state in {folder}",
        flush=True,
    )
    embedded = _init_ray(address, spec)
    status, code = "FINISHED", EXIT_OK
    errors = 0
    try:
        grid = _tuner(space, folder, spec, parent).fit()
        errors = len(grid.errors)
    except KeyboardInterrupt:
        status, code = "KILLED", EXIT_INTERRUPTED
    finally:
        import ray

        if embedded:
            from turnout.launch.ray.auth import leave_local_cluster

            ray.shutdown()
            leave_local_cluster()
    records = collect(folder, trials)
    write_json(folder / RESULTS_FILE, records)
    missing = [t for t in trials if not (folder / "trials" / t.folder / RECORD_FILE).is_file()]
    if missing and code == EXIT_OK:
        # Unfinished trials without an error: Tune stopped them (its Ctrl-C handling).
        status, code = ("FAILED", EXIT_FAILED) if errors else ("KILLED", EXIT_INTERRUPTED)
    _end_parent(first, parent, status, folder / RESULTS_FILE)
    for t in missing:
        log = folder / "trials" / t.folder / "train.log"
        print(f"turnout: trial {t.id} did not finish; log {log}", file=sys.stderr)
    print(
        f"turnout: sweep {spec.name}: {len(records)} of {len(trials)} trial(s) finished; "
        f"results {folder / RESULTS_FILE}",
        flush=True,
    )
    return code


def _end_parent(cfg: TurnoutConfig, run_id: str, status: str, results: Path) -> None:
    if not run_id:
        return
    from turnout.trainer.tracking.store import client_for, end_run

    try:
        client_for(cfg.tracking.uri).log_artifact(run_id, str(results))
    except Exception as e:  # noqa: BLE001 - the results file is on disk either way
        print(
            f"turnout: warning: could not log {results} to MLflow: {redact(str(e))}",
            file=sys.stderr,
        )
    why = end_run(cfg.tracking.uri, run_id, status, 15.0)
    if why:
        print(
            f"turnout: warning: could not mark the sweep's run {status}: {redact(why)}",
            file=sys.stderr,
        )


def report_sweep(spec_path: str | Path) -> int:
    """Fit and plot the spec's finished trials into ``<report>.json/.md/.png``."""
    from turnout.launch.sweep.report import write_report

    spec_path = spec_file(spec_path)
    spec = load_spec(spec_path)
    folder = sweep_dir(spec)
    # The spec's trials finished so far, read from their own records: a sweep still
    # running, or stopped part-way, is reported as far as it got (results.json is only
    # written when a sweep command ends).
    records = collect(folder, expand(spec))
    if not records:
        raise ConfigError(
            "sweep", f"no finished trial in {folder}: run `turnout sweep {spec_path}`"
        )
    stem = Path(spec.report) if spec.report else folder / "report"
    write_report(records, stem, command=f"turnout sweep {spec_path}", title=spec.name)
    print(f"turnout: report of {len(records)} trial(s): {stem}.md, {stem}.json, {stem}.png")
    return EXIT_OK
