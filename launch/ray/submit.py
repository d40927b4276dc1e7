"""``turnout submit``: the same training job, handed to a Ray cluster's job server.

What ``ray job submit --working-dir . -- turnout train ARGS`` does, with turnout's
manners: the config is loaded and validated here first (a bad key is one line and
exit 2, and nothing is submitted); the current folder ships as the job's working
directory, minus virtual environments, MLflow stores, checkpoints and caches; the
entrypoint is ``turnout train ARGS`` on the head node, where Ray sets ``RAY_ADDRESS`` so
the job joins that cluster; the job's output is followed here until it ends; and the
exit code says how it ended (0 only for SUCCEEDED; the job's own exit code otherwise,
else 1). Ctrl-C stops the job and exits 130; ``--no-wait`` returns once it is queued.

Submitting needs token authentication configured here (the cluster's token; see
:mod:`turnout.launch.ray.auth`), unless ``launch.allow_unauthenticated=true``.

The job server is part of Ray's dashboard (``ray start --head --include-dashboard=true``,
needs ``ray[default]``); its address is the dashboard's, ``http://HEAD:8265``, given by
``--address`` or ``RAY_API_SERVER_ADDRESS``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from turnout.config import TurnoutConfig
from turnout.config.load import load_config, split_source
from turnout.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ConfigError, RunError
from turnout.launch.ray.auth import require_token_auth

KEY = "--address"
# Never shipped with the working directory (gitignore syntax, as Ray reads it).
EXCLUDES = [
    ".venv/",
    "venv/",
    ".git/",
    "mlruns/",
    "mlartifacts/",
    "mlflow.db",
    "*.db.lock",
    "checkpoints/",
    "ray_results/",
    ".turnout/",
    ".turnout_cache/",
    ".ext/",
    "outputs/",
    "__pycache__/",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".hypothesis/",
]
_POLL_S = 0.5


def job_server_address(address: str | None) -> str:
    """The job server's URL: ``--address``, else RAY_API_SERVER_ADDRESS; checked in form."""
    given = address or os.environ.get("RAY_API_SERVER_ADDRESS", "")
    if not given:
        raise ConfigError(
            KEY,
            "name the cluster's job server (its dashboard, http://HEAD:8265) with --address "
            "or RAY_API_SERVER_ADDRESS",
        )
    url = given if "://" in given else f"http://{given}"
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(KEY, f"{given!r} is not a job server address like http://HEAD:8265")
    return url


def shipped_items(items: list[str], workdir: Path) -> list[str]:
    """``items`` as the job sees them: a config file becomes a path inside the working dir.

    Raises ConfigError when the file is outside ``workdir`` (it would not be shipped).
    """
    source, overrides = split_source(items)
    if source is None or not (source.endswith((".yaml", ".yml")) or os.sep in source):
        return list(items)  # a preset name (or none): shipped inside turnout itself
    path = Path(source).resolve()
    try:
        inside = path.relative_to(workdir.resolve())
    except ValueError:
        raise ConfigError(
            "config",
            f"{source} is outside the folder shipped to the cluster ({workdir}); "
            "copy it there or submit from a folder that holds it",
        ) from None
    return [inside.as_posix(), *overrides]


def entrypoint(items: list[str]) -> str:
    """The job's command line on the head node."""
    return shlex.join(["turnout", "train", *items])


def runtime_env(workdir: Path) -> dict[str, Any]:
    return {"working_dir": str(workdir), "excludes": list(EXCLUDES)}


def _relative_paths_note(cfg: TurnoutConfig) -> str | None:
    """A note when the run writes into its working dir, which is a copy on the head."""
    relative = []
    if not os.path.isabs(cfg.train.ckpt_dir):
        relative.append(f"train.ckpt_dir={cfg.train.ckpt_dir}")
    uri = cfg.tracking.uri
    if cfg.tracking.enabled and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        relative.append(f"tracking.uri={uri}")
    if not relative:
        return None
    return (
        f"turnout: note: {', '.join(relative)} resolve inside the job's copy of this folder "
        "on the head node; point them at shared storage or an MLflow server to keep them"
    )


def _client(url: str) -> Any:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except Exception as e:
        if isinstance(e, AuthenticationError) or "Unauthorized" in str(e):
            raise ConfigError(
                KEY,
                f"the job server at {url} refused our authentication token; use the "
                "cluster's own: RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN "
                "(or the file RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token)",
            ) from None
        raise ConfigError(
            KEY,
            f"no Ray job server answers at {url} ({type(e).__name__}); it is the head's "
            "dashboard address (ray start --head --include-dashboard=true, port 8265 by "
            "default), not the GCS port",
        ) from None


async def _follow(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _final_status(client: Any, job_id: str) -> Any:
    """The job's details once its status is terminal."""
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        time.sleep(_POLL_S)


#: What Ray's job server answers while it has no job agent ready (a cluster that has
#: just started, a loaded head node): worth trying again.
NO_AGENT = "No available agent to submit job"
#: How long a submission waits for a job agent, at most.
AGENT_WAIT_S = 120.0


def submit_when_an_agent_is_ready(
    submit_job: Callable[[], str], url: str, wait_s: float = AGENT_WAIT_S, every_s: float = 2.0
) -> str:
    """``submit_job()``'s job id, tried again every ``every_s`` while the job server says
    it has no job agent ready (one line says so), for at most ``wait_s``; any other
    error, or that one past the wait, is raised."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            return submit_job()
        except Exception as e:
            if NO_AGENT not in str(e) or time.monotonic() + every_s > deadline:
                raise
            if not said:
                print(
                    f"turnout: note: the job server at {url} has no job agent ready yet; "
                    f"trying again for up to {wait_s:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                said = True
            time.sleep(every_s)


def submit(items: list[str], address: str | None, wait: bool = True) -> int:
    """Submit ``turnout train ITEMS`` to the cluster's job server; the exit code to return."""
    source, overrides = split_source(items)
    cfg = load_config(source, overrides)  # a bad config: one line, nothing submitted
    workdir = Path.cwd()
    job_items = shipped_items(items, workdir)
    url = job_server_address(address)
    require_token_auth(url, cfg.launch.allow_unauthenticated, KEY)
    client = _client(url)
    note = _relative_paths_note(cfg)
    if note:
        print(note, file=sys.stderr, flush=True)
    try:
        job_id = submit_when_an_agent_is_ready(
            lambda: client.submit_job(
                entrypoint=entrypoint(job_items),
                runtime_env=runtime_env(workdir),
                metadata={"turnout": "train", "run_name": cfg.tracking.run_name},
            ),
            url,
        )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise RunError(f"the job server at {url} did not take the job: {first}") from None
    print(f"turnout: submitted job {job_id} to {url}", flush=True)
    if not wait:
        print(f"turnout: follow it with `ray job logs --follow {job_id} --address {url}`")
        return EXIT_OK
    try:
        asyncio.run(_follow(client, job_id))
        info = _final_status(client, job_id)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"turnout: interrupted: job {job_id} stopped", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    code = getattr(info, "driver_exit_code", None)
    print(f"turnout: job {job_id} {status}" + (f" (exit code {code})" if code else ""), flush=True)
    if status == "SUCCEEDED":
        return EXIT_OK
    return int(code) if code else EXIT_FAILED
