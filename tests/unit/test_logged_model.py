"""A checkpoint out to MLflow as a logged model that generates text (real sqlite store).

The checkpoint is a step folder in turnout's format holding a seeded random tiny model,
so these tests need no training; a trained run's model is checked end to end in
tests/e2e/test_cli_train.py and served over HTTP in tests/e2e/test_model_serving.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import tiny_checkpoint
from turnout.config.load import load_config
from turnout.launch.cli import main

pytestmark = pytest.mark.unit

PROMPT = "def main("
NEW_TOKENS = 12
#: What the tests generate with: greedy, as `turnout generate --temperature 0`.
GREEDY = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0}


def checkpoint(tmp_path: Path, *overrides: str) -> Path:
    return tiny_checkpoint(tmp_path, *overrides)


def generated(folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``turnout generate --temperature 0`` prints for :data:`PROMPT`."""
    capsys.readouterr()
    argv = ["generate", str(folder), "--prompt", PROMPT, "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def artifact_files(model_uri: str, dst: Path) -> set[str]:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    return {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}


def test_export_mlflow_logs_and_registers_a_model_that_generates_like_generate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow
    from mlflow import MlflowClient

    folder = checkpoint(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "export"
    argv = ["export", str(folder), str(out), "--mlflow", "--tracking-uri", uri]
    assert main([*argv, "--register-as", "tiny-lm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    logged = lines[-1]
    assert "copied into the artifact store" in logged, lines
    assert "registered as models:/tiny-lm/1" in logged, lines
    model_uri = logged.split("logged model ", 1)[1].split()[0]

    client = MlflowClient(tracking_uri=uri)
    model = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert str(model.status) in ("READY", "LoggedModelStatus.READY")
    # No run had written the checkpoint: the export opened one, and ended it.
    run = client.get_run(model.source_run_id)
    assert run.info.status == "FINISHED"
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    assert model.params["model.d_model"] == run.data.params["model.d_model"]
    versions = client.search_model_versions("name='tiny-lm'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].source == model_uri, versions[0]

    files = artifact_files(model_uri, tmp_path / "dl")
    for name in ("model.safetensors", "config.yaml", "tokenizer.json"):
        assert f"artifacts/{out.name}/{name}" in files, sorted(files)
    assert "MLmodel" in files and "python_model.pkl" in files

    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-lm/1")
    texts = pyfunc.predict([PROMPT, PROMPT[:4]], params=GREEDY)
    assert list(texts.columns) == ["text"]
    # The same decoder on the same weights, both in fp32 on the CPU: equal text.
    assert texts["text"][0] == generated(folder, capsys)
    assert texts["text"][1].startswith(PROMPT[:4]) and texts["text"][1] != texts["text"][0]
    # The same seed samples the same text, another seed (here) another one.
    warm = {"max_new_tokens": NEW_TOKENS, "temperature": 1.0}
    a = pyfunc.predict([PROMPT], params={**warm, "seed": 1})["text"][0]
    assert a == pyfunc.predict([PROMPT], params={**warm, "seed": 1})["text"][0]


def test_a_model_over_the_size_rule_is_logged_by_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from turnout.trainer.tracking.model_log import log_run_model

    folder = checkpoint(tmp_path, "tracking.log_model_max_mb=0")
    cfg = load_config(str(folder / "config.yaml"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.tracking.uri = uri
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    metrics = [Metric("val_loss", 3.0, 0, 2), Metric("val_loss", 2.5, 0, 4)]
    metrics.append(Metric("mfu", 0.1, 0, 4))
    client.log_batch(run_id, metrics=metrics)

    model_uri = log_run_model(cfg, run_id, str(folder), 4)
    err = capsys.readouterr().err
    assert model_uri.startswith("models:/m-"), err
    assert f"by reference to {folder}" in err and "tracking.log_model_max_mb=0" in err, err

    model = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert model.tags["turnout.weights"] == "reference"
    # The run's metrics of the model's step are linked to it, the earlier ones are not.
    assert sorted((m.key, m.step, m.value) for m in model.metrics) == [
        ("mfu", 4, 0.1),
        ("val_loss", 4, 2.5),
    ]
    files = artifact_files(model_uri, tmp_path / "dl")
    assert not any(f.endswith((".safetensors", ".pt")) for f in files), sorted(files)

    mlflow.set_tracking_uri(uri)
    texts = mlflow.pyfunc.load_model(model_uri).predict([PROMPT], params=GREEDY)
    assert texts["text"][0] == generated(folder, capsys)

    folder.rename(folder.with_name("moved"))  # the reference now points nowhere
    with pytest.raises(Exception, match="logged by reference"):
        mlflow.pyfunc.load_model(model_uri)


def test_a_store_that_refuses_the_model_costs_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from turnout.trainer.tracking.model_log import log_run_model

    folder = checkpoint(tmp_path)
    cfg = load_config(str(folder / "config.yaml"))
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert log_run_model(cfg, "0" * 32, str(folder), 4) == ""
    err = capsys.readouterr().err.strip()
    assert err.startswith("turnout: warning: could not log the model") and "\n" not in err, err


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--format", "hf", "--mlflow"], "--mlflow"),
        (["--register-as", "lm"], "--mlflow"),
        (["--mlflow", "--register-as", "a:b"], "--register-as"),
        (["--mlflow", "--tracking-uri", "ftp://x"], "--tracking-uri"),
    ],
)
def test_bad_mlflow_export_flags_exit_2_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], flag: str
) -> None:
    folder = checkpoint(tmp_path)
    out = tmp_path / "export"
    assert main(["export", str(folder), str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"turnout: error: {flag}:") and err.count("\n") == 1, err
    assert not out.exists()
