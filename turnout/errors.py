"""Every error type turnout raises on purpose, the exit codes, and the one line a user reads.

- :class:`ConfigError`: the input is wrong (a config value, a file it names). Exit 2.
- :class:`RunError`: the input was fine but the run failed in a way the user can act on
  (a checkpoint that does not load, an unreachable MLflow store). Exit 1.
- :class:`DiskError`: a write that no retry can fix (no space, a read-only filesystem, no
  permission): a :class:`RunError` naming the path and the bytes it needed. Exit 1.
- :class:`WorkerError`: what a training worker hands the launcher when it fails, as
  data (kind, key, message, rank, traceback file). It pickles, so it crosses Ray's
  process boundary intact, and the launcher never parses text to learn what happened.

The error contract of the command line: exactly one line ``turnout: error: ...`` on
stderr, built by :func:`error_line`.
"""

from __future__ import annotations

from typing import Literal

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130
#: SIGTERM (128 + 15): stopped from outside, e.g. a sweep driver or a scheduler.
EXIT_TERMINATED = 143

WorkerErrorKind = Literal["config", "runtime", "crash"]


class TurnoutError(Exception):
    """Base of the errors turnout raises on purpose (anything else is a bug or a crash)."""


class ConfigError(TurnoutError, ValueError):
    """A configuration value is wrong. ``key`` is the dotted path (``model.moe.top_k``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str]]:
        return (type(self), (self.key, self.message))


class RunError(TurnoutError, RuntimeError):
    """A run failed for a reason the user can act on; not a config error.

    ``key`` names the setting involved when there is one (``train.resume``), else ''.
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    def __reduce__(self) -> tuple[type[RunError], tuple[str, str]]:
        return (type(self), (self.message, self.key))


class CheckpointError(RunError):
    """A checkpoint exists but cannot be loaded into this run (``key`` is train.resume)."""

    def __init__(self, message: str, key: str = "train.resume") -> None:
        super().__init__(message, key)


class DiskError(RunError):
    """A checkpoint (or its run folder's bookkeeping) could not be written for a reason a
    retry would meet again: no space, a quota, a read-only filesystem, no permission, a
    file-size limit. ``key`` is ``train.ckpt_dir``; the message names the path and the
    bytes needed (:mod:`turnout.trainer.checkpointing.disk`)."""

    def __init__(self, message: str, key: str = "train.ckpt_dir") -> None:
        super().__init__(message, key)


def one_line(error: BaseException) -> str:
    """An exception as one line: our own errors whole, any other ``Type: first line``."""
    text = str(error).strip()
    if isinstance(error, TurnoutError):
        return " ".join(text.split()) or type(error).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    name = type(error).__name__
    return f"{name}: {lines[0]}" if lines else name


def error_line(text: str) -> str:
    """The line the command line prints for an error (whitespace collapsed to one line,
    secrets left out: :func:`turnout.redact.redact`)."""
    from turnout.redact import redact

    return "turnout: error: " + " ".join(redact(text).split())


class WorkerError(TurnoutError):
    """A training worker failed; the record the launcher reports from.

    ``kind``: 'config' (a :class:`ConfigError` only a worker could find: exit 2),
    'runtime' (the training code raised: exit 1) or 'crash' (the worker died without
    handing back a record, e.g. killed or out of memory: exit 1). ``key`` is the
    config key for 'config' (and a :class:`RunError`'s key), ``message`` one line,
    ``rank`` the worker's global rank (-1 if unknown), ``log`` the file with the full
    traceback (or the folder of the worker logs for a crash; '' if none).
    """

    def __init__(
        self, kind: WorkerErrorKind, message: str, rank: int, key: str = "", log: str = ""
    ) -> None:
        self.kind: WorkerErrorKind = kind
        self.message = message
        self.rank = rank
        self.key = key
        self.log = log
        super().__init__(self.text())

    def __reduce__(self) -> tuple[type[WorkerError], tuple[str, str, int, str, str]]:
        return (type(self), (self.kind, self.message, self.rank, self.key, self.log))

    @classmethod
    def from_exception(cls, error: BaseException, rank: int, log: str = "") -> WorkerError:
        """The record of ``error`` raised on worker ``rank`` (traceback written to ``log``)."""
        if isinstance(error, WorkerError):
            return error
        if isinstance(error, ConfigError):
            return cls("config", " ".join(error.message.split()), rank, error.key, log)
        key = error.key if isinstance(error, RunError) else ""
        return cls("runtime", one_line(error), rank, key, log)

    @property
    def exit_code(self) -> int:
        return EXIT_CONFIG if self.kind == "config" else EXIT_FAILED

    def text(self) -> str:
        """What follows ``turnout: error:`` for this failure (one line)."""
        if self.kind == "config":
            return f"{self.key}: {self.message}"
        where = f"rank {self.rank}" if self.rank >= 0 else "a worker"
        if not self.log:
            hint = ""
        elif self.kind == "crash":
            hint = f" (worker logs: {self.log})"
        else:
            hint = f" (traceback: {self.log})"
        return f"training failed on {where}: {self.message}{hint}"
