"""Joining a running Ray cluster: the address, a reachability probe, and one-line failures.

``turnout train --address`` (``launch.address``, else ``RAY_ADDRESS``) joins a cluster
started with ``ray start --head``. Ray's own failures here are poor guides: an address
where nothing listens makes ``ray.init`` retry for minutes, and a cluster that refuses
our authentication token prints a warning a second from Ray's C++ core for ~20 s, then
a 60-line traceback ending in ``ConnectionError: Failed to connect``. So:

- :func:`check_reachable` opens one TCP connection to the address first (3 s), and an
  address nobody answers on is one line, at once, before an MLflow run is opened;
- :func:`join_cluster` runs ``ray.init`` with file descriptor 2 spilled to a temporary
  file and, when it fails, reads Ray's words there to tell a refused token from the
  rest. Either way the user reads one line naming ``launch.address`` and what to do
  (a :class:`ConfigError`, exit 2).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from typing import Any

from turnout.config import TurnoutConfig
from turnout.errors import ConfigError

KEY = "launch.address"
PROBE_TIMEOUT_S = 3.0
DEFAULT_GCS_PORT = 6379
# What Ray says when the cluster's token authentication refuses us (or we have none).
_AUTH_MARKERS = ("Unauthenticated", "InvalidAuthToken", "AuthenticationError", "auth token")


def cluster_address(cfg: TurnoutConfig) -> str:
    """The cluster to join: ``launch.address``, else ``RAY_ADDRESS``, else '' (embedded)."""
    return cfg.launch.address or os.environ.get("RAY_ADDRESS", "")


def _source(address: str) -> str:
    from_env = os.environ.get("RAY_ADDRESS", "") == address
    return f"{address!r} (from RAY_ADDRESS)" if from_env else repr(address)


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS or Ray Client address; None for 'auto' / 'local'.

    Raises ConfigError for a dashboard (HTTP) address, which ``turnout submit`` takes,
    not ``turnout train``.
    """
    if address in ("auto", "local"):
        return None
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            KEY,
            f"{_source(address)} is a dashboard (job API) address: `turnout train` joins "
            "the cluster's GCS address host:port (6379 by default); `turnout submit` takes "
            "the dashboard address",
        )
    rest = address.removeprefix("ray://")
    if rest.startswith("["):  # [ipv6]:port
        host, _, port = rest[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host:
        raise ConfigError(KEY, f"{_source(address)} names no host; expected host:port")
    try:
        return host, int(port) if port else DEFAULT_GCS_PORT
    except ValueError:
        raise ConfigError(
            KEY, f"{_source(address)}: port {port!r} is not a number; expected host:port"
        ) from None


def check_reachable(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ConfigError (one line) unless something accepts a TCP connection there."""
    target = host_port(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except socket.gaierror:
        why = f"host {host!r} is unknown"
    except TimeoutError:
        why = f"no answer within {timeout_s:g} s"
    except OSError as e:
        why = e.strerror.lower() if e.strerror else type(e).__name__
    raise ConfigError(
        KEY,
        f"no Ray cluster answers at {_source(address)} ({why}); start its head there with "
        f"`ray start --head --port {port}`, fix the address, or leave launch.address empty "
        "(and RAY_ADDRESS unset) for a local cluster",
    )


def _error_text(error: BaseException) -> str:
    parts = []
    seen: BaseException | None = error
    while seen is not None:
        parts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def join_failure(address: str, error: BaseException, ray_output: str) -> ConfigError:
    """The one-line error for a failed ``ray.init(address=...)``, from Ray's words."""
    said = f"{_error_text(error)}\n{ray_output}"
    if any(m in said for m in _AUTH_MARKERS):
        return ConfigError(
            KEY,
            f"the Ray cluster at {_source(address)} refused our authentication token; "
            "use the cluster's own: RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN "
            "(or in the file named by RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token), "
            "as on its nodes",
        )
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    last = lines[-1] if lines else type(error).__name__
    return ConfigError(
        KEY,
        f"could not join the Ray cluster at {_source(address)} ({last}); check that it "
        "runs the same Ray and Python versions as this machine (`ray status` on its head)",
    )


def join_cluster(address: str, init_kw: dict[str, Any], verbose: bool = False) -> None:
    """``ray.init(address=address)``; a failure becomes :func:`join_failure`'s line.

    Unless ``verbose``, what Ray writes to stderr while connecting is kept back (spilled to
    a temporary file and read only to name a failure).
    """
    import ray

    if verbose:
        try:
            ray.init(address=address, **init_kw)
        except Exception as e:
            raise join_failure(address, e, "") from None
        return
    with tempfile.TemporaryFile() as spill:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        os.dup2(spill.fileno(), 2)
        error: Exception | None = None
        try:
            ray.init(address=address, **init_kw)
        except Exception as e:
            error = e
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        if error is None:
            return
        spill.seek(0)
        said = spill.read().decode(errors="replace")
    raise join_failure(address, error, said) from None
