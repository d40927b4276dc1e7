"""Who may talk to the Ray cluster a turnout job runs on.

Anyone who reaches a Ray cluster's GCS or job server runs code on it as its owner, so:

- **An embedded cluster is this machine's alone** (:func:`isolate_local_cluster`, before
  ``ray.init`` starts one). Ray 2.60 binds its servers (GCS, raylet, object manager,
  every worker's gRPC server, the dashboard and runtime-env agents) to the node's
  address, which ``ray._private.services.get_node_ip_address`` takes from the network
  unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray's own switch for the machines on
  which it does not form clusters, where the node address is 127.0.0.1. Set in the
  environment, it reaches every process the cluster starts. The cluster also runs with
  token authentication (``RAY_AUTH_MODE=token``) and a token made here for this run
  (``RAY_AUTH_TOKEN``, 256 random bits), which its processes inherit; it is never printed,
  and :mod:`turnout.redact` masks it wherever turnout writes.
- **Joining or submitting needs token authentication** (:func:`require_token_auth`):
  ``RAY_AUTH_MODE=token`` (or unset, as Ray then turns it on itself) and a token in
  ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``. Without
  one the command is refused in one line saying how to set it up, unless
  ``launch.allow_unauthenticated=true``, which prints a warning naming the risk.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

from turnout.errors import ConfigError

MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
#: Ray's switch that makes the node address loopback (see the module doc).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"
ALLOW_KEY = "launch.allow_unauthenticated"
_warned: set[str] = set()  # targets this process has warned about (once each)
_saved: dict[str, str | None] = {}  # the environment isolate_local_cluster replaced
_HOW = (
    "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or in the file "
    "named by RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token), as on its nodes "
    "(`ray get-auth-token --generate` makes one for a new cluster; see docs/security.md)"
)


def default_token_path() -> Path:
    """Ray's default token file, ``~/.ray/auth_token``."""
    return Path.home() / ".ray" / "auth_token"


def _token_available() -> bool:
    if os.environ.get(TOKEN_ENV, "").strip():
        return True
    path = Path(os.environ.get(TOKEN_PATH_ENV) or default_token_path()).expanduser()
    try:
        return bool(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return False


def token_auth_configured() -> bool:
    """Whether Ray clients of this process will present a token (see the module doc)."""
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    return mode in ("", "token") and _token_available()


def require_token_auth(target: str, allow_unauthenticated: bool, key: str) -> None:
    """Refuse (ConfigError naming ``key``) to reach ``target`` without token authentication.

    ``allow_unauthenticated`` turns the refusal into a warning on stderr. When a token is
    there but ``RAY_AUTH_MODE`` is unset, the mode is set to ``token`` for this process.
    """
    if token_auth_configured():
        os.environ.setdefault(MODE_ENV, "token")
        return
    if target in _warned:
        return
    if not allow_unauthenticated:
        raise ConfigError(
            key,
            f"refusing to reach the Ray cluster at {target} without token authentication: "
            f"{_HOW}; or accept the risk with {ALLOW_KEY}=true",
        )
    _warned.add(target)
    print(
        f"turnout: warning: reaching the Ray cluster at {target} without token "
        f"authentication ({ALLOW_KEY}=true): anyone who can reach its ports can run code "
        "on it as you and read what it trains",
        file=sys.stderr,
        flush=True,
    )


def isolate_local_cluster() -> None:
    """Environment for an embedded cluster: loopback only, a fresh token (module doc).

    Call before ``ray.init`` starts the cluster; the processes it starts inherit it.
    :func:`leave_local_cluster`, after ``ray.shutdown``, puts this process's environment
    back, so a later cluster it joins or a ``ray start`` it runs is not loopback-only.
    """
    if not _saved:
        for var in (LOCAL_ONLY_ENV, MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV):
            _saved[var] = os.environ.get(var)
    os.environ[LOCAL_ONLY_ENV] = "0"
    os.environ[MODE_ENV] = "token"
    os.environ[TOKEN_ENV] = secrets.token_hex(32)
    os.environ.pop(TOKEN_PATH_ENV, None)  # the token above, not a file's
    from ray._private import ray_constants

    # Read at import: when Ray was imported before the line above, set it there too.
    ray_constants.ENABLE_RAY_CLUSTER = False
    _reset_token_cache()


def leave_local_cluster() -> None:
    """Undo :func:`isolate_local_cluster` in this process (after ``ray.shutdown``)."""
    if not _saved:
        return
    for var, value in _saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    _saved.clear()
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(
        LOCAL_ONLY_ENV, not ray_constants.IS_WINDOWS_OR_OSX
    )
    _reset_token_cache()


def _reset_token_cache() -> None:
    try:  # this process may have read an earlier mode or token already (Ray caches both)
        from ray._raylet import (  # type: ignore[attr-defined]  # compiled, no stubs
            AuthenticationTokenLoader,
            Config,
        )

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):
        pass


def local_init_kw() -> dict[str, Any]:
    """``ray.init`` arguments for an embedded cluster: a new one (never a cluster Ray would
    find on this machine by itself, through /tmp/ray), its addresses on loopback."""
    return {"address": "local", "_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}
