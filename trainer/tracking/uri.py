"""The one reader of ``tracking.uri``: which MLflow store it names, and where its files go.

Accepted stores: a plain path or a ``file:`` URI (MLflow's file store), ``sqlite:///``
(the default, a database file), ``http(s)://`` (a tracking server), ``databricks`` and
the other databases MLflow ships a store for (postgresql, mysql, mssql; each may carry a
``+driver``). Anything else is a config error, found on the launcher before a worker
starts. Used by the launcher (:mod:`turnout.launch.paths`, the CLI) and by the tracker.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from turnout.errors import ConfigError

SQLITE_PREFIX = "sqlite:///"
_FILE_PREFIX = "file://"
# MLflow's SQLAlchemy store engines (mlflow.store.db.db_types.DATABASE_ENGINES).
_DB_ENGINES = ("postgresql", "mysql", "mssql", "sqlite")
_SERVER_SCHEMES = ("http", "https", "databricks")


def uri_scheme(uri: str) -> str:
    """The store kind of ``uri``: '' for a plain path, 'file', 'http', 'postgresql', ...

    A database scheme loses its ``+driver`` part (``mysql+pymysql`` -> ``mysql``).
    """
    scheme = urlparse(uri).scheme.lower()
    if uri == "databricks" or scheme == "databricks":
        return "databricks"
    return scheme.split("+", 1)[0] if scheme.count("+") == 1 else scheme


def check_tracking_uri(uri: str) -> None:
    """Raise ConfigError('tracking.uri') unless ``uri`` names a store MLflow can open."""
    if not uri.strip():
        raise ConfigError("tracking.uri", "is empty (tracking.enabled=false turns tracking off)")
    scheme = uri_scheme(uri)
    if scheme in ("", "file", *_SERVER_SCHEMES, *_DB_ENGINES):
        return
    raise ConfigError(
        "tracking.uri",
        f"unsupported store {uri!r}: use a path, file:, sqlite:///, http(s)://, databricks "
        "or postgresql/mysql/mssql://",
    )


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (as written), or None for other stores."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    rest = uri[len(SQLITE_PREFIX) :]
    return Path(rest) if rest and rest != ":memory:" else None


def absolute_tracking_uri(uri: str, cwd: Path | None = None) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/mlflow.db``; plain/file paths -> absolute.

    Server and other database URIs are returned unchanged.
    """
    base = cwd or Path.cwd()
    db = sqlite_db_path(uri)
    if db is not None:
        db = db.expanduser()
        return uri if db.is_absolute() else SQLITE_PREFIX + str((base / db).resolve())
    scheme = uri_scheme(uri) if uri else "other"
    if scheme == "file" and uri.startswith(_FILE_PREFIX):
        rest = uri[len(_FILE_PREFIX) :]
        return uri if rest.startswith("/") else _FILE_PREFIX + str((base / rest).resolve())
    if scheme == "":
        return str((base / uri).resolve())
    return uri


def local_sqlite_uri(uri: str) -> str:
    """``uri`` with a sqlite database path made absolute (``~`` expanded); others as given."""
    db = sqlite_db_path(uri)
    return uri if db is None else SQLITE_PREFIX + str(db.expanduser().resolve())


def sqlite_artifact_root(uri: str) -> str | None:
    """For ``sqlite:///path/x.db``, the folder beside the database that holds artifacts."""
    db = sqlite_db_path(uri)
    if db is None:
        return None
    return (db.expanduser().resolve().parent / "mlartifacts").as_uri()
