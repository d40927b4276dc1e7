"""The overrides a launcher hands to the processes it starts through the environment
(``TURNOUT_LAUNCHER_OVERRIDES``), and which overrides never go on a command line."""

from __future__ import annotations

import json

import pytest

from turnout.errors import ConfigError
from turnout.launch.torchrun import OVERRIDES_ENV, launcher_overrides, split_secret

pytestmark = pytest.mark.unit


def test_overrides_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OVERRIDES_ENV, raising=False)
    assert launcher_overrides() == []
    items = ["tracking.uri=https://u:p@host", "train.resume=/ckpt/step4"]
    monkeypatch.setenv(OVERRIDES_ENV, json.dumps(items))
    assert launcher_overrides() == items


@pytest.mark.parametrize("bad", ["tracking.uri=x", "{}", '["a", 1]', "[nope"])
def test_a_malformed_value_is_one_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv(OVERRIDES_ENV, bad)
    with pytest.raises(ConfigError) as e:
        launcher_overrides()
    assert e.value.key == OVERRIDES_ENV


def test_the_tracking_uri_is_split_off() -> None:
    shown, secret = split_secret(
        [
            "train.steps=4",
            "tracking.uri=https://u:p@host",
            " tracking.uri =x",
            "tracking.enabled=false",
        ]
    )
    assert shown == ["train.steps=4", "tracking.enabled=false"]
    assert secret == ["tracking.uri=https://u:p@host", " tracking.uri =x"]
