"""The one error type for bad configuration: it names the offending dotted key."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong. ``key`` is the dotted path (``model.moe.top_k``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
