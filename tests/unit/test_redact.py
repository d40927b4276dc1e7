"""Secrets never reach a record: URL credentials and secret environment values are left
out of the saved config, MLflow params, error lines and the summary's store hint."""

from __future__ import annotations

import pytest

from turnout.config.load import flatten, load_config, to_yaml
from turnout.errors import error_line
from turnout.launch.summary import ui_hint
from turnout.redact import MASK, SECRET_ENV, redact, strip_credentials

pytestmark = pytest.mark.unit

PASSWORD = "hunter2-planted-pw"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://bob:pw@mlflow.example:5000/x", "https://mlflow.example:5000/x"),
        ("postgresql+psycopg2://u:p@db/mlflow", "postgresql+psycopg2://db/mlflow"),
        ("http://token@host", "http://host"),
        ("see 'https://a:b@h/p' and http://c:d@e", "see 'https://h/p' and http://e"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("file:///a/b@c/d", "file:///a/b@c/d"),  # an @ in a path is not a credential
        ("user@example.com wrote", "user@example.com wrote"),
    ],
)
def test_strip_credentials(text: str, expected: str) -> None:
    assert strip_credentials(text) == expected


def test_secret_env_values_are_masked_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    for i, name in enumerate(SECRET_ENV):
        monkeypatch.setenv(name, f"planted-secret-{i}-{name.lower()}")
    text = " ".join(
        f"x{v}y" for v in (f"planted-secret-{i}-{n.lower()}" for i, n in enumerate(SECRET_ENV))
    )
    out = redact(text)
    assert "planted-secret" not in out
    assert out.count(MASK) == len(SECRET_ENV)
    monkeypatch.setenv("HF_TOKEN", "1")  # too short to be a secret: numbers stay intact
    assert redact("step 1 of 10") == "step 1 of 10"


def test_config_records_leave_credentials_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    uri = f"https://alice:{PASSWORD}@mlflow.example/prefix"
    cfg = load_config("tiny", [f"tracking.uri={uri}", f"tracking.run_name=x{PASSWORD}"])
    assert cfg.tracking.uri == uri  # the run itself still has them
    saved = to_yaml(cfg)
    params = flatten(cfg)
    assert PASSWORD not in saved and "alice" not in saved
    assert params["tracking.uri"] == "https://mlflow.example/prefix"
    assert params["tracking.run_name"] == f"x{MASK}"
    assert not any(PASSWORD in v for v in params.values())
    # The saved config still loads, naming the same store.
    again = load_config(None, [f"tracking.uri={params['tracking.uri']}"])
    assert again.tracking.uri == "https://mlflow.example/prefix"


def test_error_lines_and_the_store_hint_leave_credentials_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)
    line = error_line(f"cannot open https://u:{PASSWORD}@h/ with token {'f' * 64}")
    assert PASSWORD not in line and "f" * 64 not in line
    assert line == f"turnout: error: cannot open https://h/ with token {MASK}"
    assert ui_hint(f"https://u:{PASSWORD}@h:5000") == "open https://h:5000"
