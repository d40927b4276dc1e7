"""Load a config: defaults <- preset or YAML file <- ``a.b=c`` overrides, validated.

``load_config`` merges them into the structured :class:`TurnoutConfig` and validates every
range and cross-field rule. Any problem becomes a :class:`ConfigError` naming the dotted
key, before a worker starts. Presets are the package data of ``turnout.configs``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from turnout.config.root import TurnoutConfig, validate
from turnout.errors import ConfigError
from turnout.redact import redact

DEFAULT_PRESET = "tiny"


def preset_dir() -> Path:
    """The folder holding the preset YAML files (package data of ``turnout.configs``)."""
    return Path(str(resources.files("turnout.configs")))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def _read_yaml(path: Path, label: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(label, f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise ConfigError(label, f"{path} is not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(label, f"{path} must hold a mapping at the top level")
    return data


def _source(name: str | None) -> dict:
    if name is None:
        name = DEFAULT_PRESET
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError("config", f"no such config file: {name}")
        return _read_yaml(path, "config")
    path = preset_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            "config", f"unknown preset {name!r}; presets: {', '.join(preset_names())}"
        )
    return _read_yaml(path, "config")


def split_source(items: list[str]) -> tuple[str | None, list[str]]:
    """Command-line items -> (preset name or YAML path, ``a.b=c`` overrides).

    The first item is the source when it holds no '='; otherwise the default preset.
    """
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    return None, list(items)


def _omegaconf_error(e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", None) or "config"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(str(key), msg)


def load_config(
    source: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TurnoutConfig:
    """Merge defaults, a preset name or YAML path, and ``a.b=c`` overrides; validate."""
    base = OmegaConf.structured(TurnoutConfig)
    try:
        merged = OmegaConf.merge(base, _source(source))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(item, "override must look like key=value")
            key, value = item.split("=", 1)
            parsed = yaml.safe_load(value) if value.strip() else ""
            if OmegaConf.select(merged, key, default="__missing__") == "__missing__":
                raise ConfigError(key, "unknown key")
            OmegaConf.update(merged, key, parsed, merge=False)
        cfg: TurnoutConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    except yaml.YAMLError as e:
        raise ConfigError("overrides", f"cannot parse value: {e}") from None
    validate(cfg)
    return cfg


def _record(cfg: TurnoutConfig) -> Any:
    """``cfg`` as a plain container, every string without secrets (turnout.redact)."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return redact(node) if isinstance(node, str) else node

    return clean(OmegaConf.to_container(OmegaConf.structured(cfg)))


def to_yaml(cfg: TurnoutConfig) -> str:
    """``cfg`` as YAML for a record or the screen: credentials and secrets left out."""
    return OmegaConf.to_yaml(OmegaConf.create(_record(cfg)))


def flatten(cfg: TurnoutConfig) -> dict[str, str]:
    """Dotted key -> string value, for MLflow params (secrets left out, as in to_yaml)."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(node)

    walk("", _record(cfg))
    return out
