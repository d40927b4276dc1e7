"""End to end: ``turnout train`` through a real local Ray cluster with 2 workers, then the
MLflow store is opened and the run's params, metrics, tags, artifact and logged model
are checked;
the same worker entry under plain torchrun; and a check only a worker makes reported as
the worker's own error record. (A worker's training failure in one line, with its rank
and log: tests/e2e/test_run_endings.py's diverging run.)

Each run is a few optimizer steps of the tiny preset on a slice of the standard library,
in a fresh working directory (which also shows where the MLflow store and the
checkpoints land: next to the user, not in a Ray temp dir).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from turnout.config.load import load_config

pytestmark = pytest.mark.e2e

SHORT = [
    "train.steps=4",
    "train.eval_every=2",
    "train.log_every=2",
    "train.eval_batches=2",
    "train.warmup_steps=1",
    "train.micro_batch_size=4",
    "model.max_seq_len=64",
    "data.max_bytes=300000",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # always the embedded cluster here
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _turnout() -> list[str]:
    exe = Path(sys.executable).with_name("turnout")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("turnout")
    return [found] if found else [sys.executable, "-m", "turnout.launch.cli"]


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _summary_value(stdout: str, label: str) -> str:
    m = re.search(rf"^\s+{re.escape(label)}\s+(\S+)", stdout, re.MULTILINE)
    assert m, f"no {label!r} in:\n{stdout}"
    return m.group(1)


def test_train_through_ray_logs_to_mlflow(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    overrides = [*SHORT, "tracking.run_name=e2e", "tracking.experiment=e2e"]
    proc = _run([*_turnout(), "train", "tiny", *overrides], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "turnout: training finished" in proc.stdout

    # The default relative store sqlite:///mlflow.db landed in the user's cwd.
    db = tmp_path / "mlflow.db"
    assert db.is_file(), sorted(os.listdir(tmp_path))
    uri = f"sqlite:///{db}"
    assert f"mlflow ui --backend-store-uri {uri}" in proc.stdout
    run_id = _summary_value(proc.stdout, "MLflow run id")
    train_loss = float(_summary_value(proc.stdout, "final train loss"))
    val_loss = float(_summary_value(proc.stdout, "final val loss"))
    entropy = float(_summary_value(proc.stdout, "corpus unigram entropy"))
    assert 0 < train_loss < 6 and 0 < val_loss < 6 and 2 < entropy < 5.6

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "e2e"
    params = run.data.params
    assert params["model.moe.num_experts"] == "4"
    assert params["model.moe.top_k"] == "2"
    assert params["launch.num_workers"] == "2"
    assert params["train.steps"] == "4"
    assert params["model.max_seq_len"] == "64"
    cfg = load_config("tiny", overrides)
    tags = run.data.tags
    assert tags["world_size"] == "2"
    assert tags["ep_size"] == str(cfg.parallel.ep_size)
    assert params["parallel.ep_size"] == str(cfg.parallel.ep_size)
    assert tags["zero_stage"] == "2"
    assert tags.get("git_commit")

    # Metrics by step; the printed final losses are the logged ones (printed with 4
    # decimals, hence 1e-4).
    loss = client.get_metric_history(run_id, "loss")
    assert [m.step for m in loss] == [2, 4]
    assert loss[-1].value == pytest.approx(train_loss, abs=1e-4)
    val = client.get_metric_history(run_id, "val_loss")
    assert [m.step for m in val] == [2, 4]
    assert val[-1].value == pytest.approx(val_loss, abs=1e-4)
    metrics = run.data.metrics
    for key in ("lr", "tokens_per_s", "grad_norm", "unigram_entropy"):
        assert key in metrics, key
    kinds = cfg.model.blocks()
    moe_layers = [i for i, k in enumerate(kinds) if k.has_moe]
    mod_layers = [i for i, k in enumerate(kinds) if k.mod_routed]
    assert moe_layers and mod_layers
    for i in moe_layers:
        loads = [metrics[f"layer{i}/expert{e}_load"] for e in range(cfg.model.moe.num_experts)]
        # Fractions logged as fp32 each: their sum is 1 to ~E * 6e-8; 1e-4 is loose but
        # a lost expert would be off by ~1/E.
        assert sum(loads) == pytest.approx(1.0, abs=1e-4)
        assert all(0.0 <= x <= 1.0 for x in loads)
        # load_max and the loads are the same fp32 values, stored as float64 by MLflow.
        assert metrics[f"layer{i}/load_max"] == pytest.approx(max(loads), abs=1e-6)
        assert 0.0 <= metrics[f"layer{i}/drop_fraction"] <= 1.0
    for i in mod_layers:
        # The preset's capacity (0.25) of 64 positions: exactly 16 chosen per sequence.
        assert cfg.model.mod.capacity * 64 == int(cfg.model.mod.capacity * 64)
        assert metrics[f"layer{i}/mod_capacity"] == pytest.approx(cfg.model.mod.capacity, abs=1e-6)
        assert 0.0 <= metrics[f"layer{i}/mod_pred_acc"] <= 1.0

    # The resolved config is an artifact, and it is the config that ran.
    local = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    logged = yaml.safe_load(Path(local).read_text())
    assert logged["model"]["moe"]["num_experts"] == 4
    assert logged["train"]["steps"] == 4

    # Checkpoints and Ray's run state are in the cwd too.
    ckpt = Path(_summary_value(proc.stdout, "checkpoint"))
    assert ckpt.is_dir() and tmp_path in ckpt.parents
    assert (tmp_path / ".turnout" / "ray").is_dir()

    # The final checkpoint is the run's logged model (tracking.log_model, on by default):
    # copied (tiny), the final step's metrics linked, and it generates what
    # `turnout generate --temperature 0` prints.
    model_uri = _summary_value(proc.stdout, "MLflow model")
    assert f"logged model {model_uri} to MLflow run {run_id}" in out
    model = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert model.source_run_id == run_id and model.tags["turnout.weights"] == "copied"
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model.model_id]
    linked = {m.key: m.value for m in model.metrics if m.step == 4}
    assert linked["val_loss"] == pytest.approx(val_loss, abs=1e-4)
    prompt = "import os"
    gen = _run(
        [*_turnout(), "generate", str(ckpt), "--prompt", prompt, "--temperature", "0"]
        + ["--max-new-tokens", "12"],
        tmp_path,
    )
    assert gen.returncode == 0, gen.stderr
    import mlflow

    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    params = {"max_new_tokens": 12, "temperature": 0.0}
    assert pyfunc.predict([prompt], params=params)["text"][0] == gen.stdout.removesuffix("\n")


def test_worker_config_error_reaches_the_launcher_as_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check only a worker makes (here: the token cache it is handed is not one) comes
    back through Ray as the worker's own WorkerError record: kind 'config', exit code 2."""
    from turnout.errors import EXIT_CONFIG, WorkerError, error_line
    from turnout.launch.paths import resolve_paths
    from turnout.launch.ray.run import run_ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = resolve_paths(load_config("tiny", [*SHORT, "tracking.enabled=false"]))
    with pytest.raises(WorkerError) as info:
        run_ray(cfg, tmp_path / "not-a-cache")
    err = info.value
    assert (err.kind, err.key, err.exit_code) == ("config", "data.cache_dir", EXIT_CONFIG)
    assert err.rank in (0, 1)
    assert "is not a token cache" in err.message
    assert error_line(err.text()) == f"turnout: error: data.cache_dir: {err.message}"
    log = Path(err.log)
    assert log.name == f"rank{err.rank}.log" and tmp_path in log.parents
    assert "ConfigError" in log.read_text()


def test_worker_entry_under_torchrun(tmp_path: Path) -> None:
    """The same worker entry without Ray (and without MLflow): what the GPU box runs."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "turnout.launch.worker",
        "tiny",
        *SHORT,
        "tracking.enabled=false",
    ]
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("turnout: training finished") == 1  # rank 0 only
    train_loss = float(_summary_value(proc.stdout, "final train loss"))
    val_loss = float(_summary_value(proc.stdout, "final val loss"))
    assert 0 < train_loss < 6 and 0 < val_loss < 6
    assert "MLflow                 disabled" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "checkpoints").is_dir()
