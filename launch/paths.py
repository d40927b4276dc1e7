"""Make a config's relative paths absolute against the launcher's working directory.

Ray workers (and a joined cluster's nodes) do not necessarily run in the directory the
user typed ``turnout train`` in. Resolving every path-like field on the driver, before
the config is shipped, makes MLflow's ``sqlite:///mlflow.db``, the checkpoints and the
token cache land where the user expects: next to them.
"""

from __future__ import annotations

import copy
from pathlib import Path

from turnout.config import TurnoutConfig

_REMOTE_SCHEMES = ("http://", "https://", "databricks", "postgresql", "mysql", "mssql")


def absolute_tracking_uri(uri: str, cwd: Path | None = None) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/mlflow.db``; plain/file paths -> absolute.

    Server URIs (http, https, databricks, other databases) are returned unchanged.
    """
    base = cwd or Path.cwd()
    if not uri or uri.startswith(_REMOTE_SCHEMES):
        return uri
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :]
        if rest.startswith("/") or rest == ":memory:" or not rest:
            return uri
        return "sqlite:///" + str((base / rest).resolve())
    if uri.startswith("file://"):
        rest = uri[len("file://") :]
        if rest.startswith("/"):
            return uri
        return "file://" + str((base / rest).resolve())
    if "://" in uri:
        return uri
    return str((base / uri).resolve())


def _abs(path: str, base: Path) -> str:
    if not path:
        return path
    return str((base / Path(path).expanduser()).resolve())


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for other stores."""
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :]
        return Path(rest) if rest and rest != ":memory:" else None
    return None


def resolve_paths(cfg: TurnoutConfig, cwd: Path | None = None) -> TurnoutConfig:
    """A copy of ``cfg`` whose file-system paths are absolute (relative to ``cwd``)."""
    base = (cwd or Path.cwd()).resolve()
    out = copy.deepcopy(cfg)
    out.tracking.uri = absolute_tracking_uri(out.tracking.uri, base)
    if out.data.corpus != "stdlib":
        out.data.corpus = _abs(out.data.corpus, base)
    out.data.cache_dir = _abs(out.data.cache_dir, base)
    out.train.ckpt_dir = _abs(out.train.ckpt_dir, base)
    out.train.resume = _abs(out.train.resume, base)
    out.launch.storage_path = _abs(out.launch.storage_path or ".turnout/ray", base)
    return out
