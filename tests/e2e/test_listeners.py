"""End to end: while a job trains under ``--launcher torchrun``, nothing of it listens on
a network interface other than loopback, and no process it starts shows the tracking URI
on its command line. The same watch of a job on its embedded Ray cluster is part of
tests/e2e/test_secrets.py (that job logs to a password-protected server, so the one run
is audited for both at once); the helpers here serve both.

The job (``turnout train tiny``, a few steps) runs as a subprocess. While it runs, the
listening sockets (TCP in LISTEN, UDP bound without a peer) of every process of the job
are collected again and again: the processes descended from the ``turnout`` process, and
every process whose command line names the Ray session that job started (a Ray
process that left the tree still carries its session's name). Ray processes of other
sessions on this machine are never looked at. Any listener whose address is not a
loopback address fails the test, named with its process.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_cli_train import SHORT, _env, _turnout
from turnout.parallel.dist import is_loopback

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")
_POLL_S = 0.2
Listener = tuple[str, str, str, int]  # (process name, kind, address, port)


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def job_processes(root: psutil.Process, sessions: set[str]) -> list[psutil.Process]:
    """``root``, its descendants and every process of a Ray session they name.

    ``sessions`` grows with each session name found on a descendant's command line.
    """
    try:
        procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        procs = {}
    for proc in procs.values():
        sessions.update(_SESSION.findall(cmdline(proc)))
    if sessions:
        for proc in psutil.process_iter():
            if proc.pid not in procs and any(s in cmdline(proc) for s in sessions):
                procs[proc.pid] = proc
    return list(procs.values())


def listeners(proc: psutil.Process) -> set[Listener]:
    """The sockets ``proc`` listens on: TCP in LISTEN and UDP bound without a peer."""
    found: set[Listener] = set()
    try:
        name = proc.name()
        conns = proc.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return found
    for c in conns:
        if not c.laddr:
            continue
        if c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN:
            found.add((name, "tcp", c.laddr.ip, c.laddr.port))
        elif c.type == socket.SOCK_DGRAM and not c.raddr:
            found.add((name, "udp", c.laddr.ip, c.laddr.port))
    return found


def table(found: set[Listener]) -> str:
    return "\n".join(f"  {n:<28} {k} {a}:{p}" for n, k, a, p in sorted(found))


class JobWatch:
    """What is seen of a running job, poll after poll: the listeners of its processes,
    the Ray sessions they name, and their command lines (all but the root's)."""

    def __init__(self, root: psutil.Process) -> None:
        self.root = root
        self.sessions: set[str] = set()
        self.found: set[Listener] = set()
        self._lines: dict[int, str] = {}

    def poll(self) -> None:
        for p in job_processes(self.root, self.sessions):
            self.found |= listeners(p)
            if p.pid != self.root.pid:
                self._lines[p.pid] = self._lines.get(p.pid) or cmdline(p)

    def lines(self) -> list[str]:
        return [ln for ln in self._lines.values() if ln]


def _watch(cmd: list[str], cwd: Path) -> tuple[int, str, set[Listener], set[str], list[str]]:
    """Run ``cmd``; (exit code, output, listeners seen, Ray sessions seen, the command
    lines of the job's processes other than the one started)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    watch = JobWatch(psutil.Process(proc.pid))
    try:
        while proc.poll() is None:
            watch.poll()
            time.sleep(_POLL_S)
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    finally:
        if proc.poll() is None:  # the job and what it started, by pid
            for p in job_processes(watch.root, watch.sessions):
                with contextlib.suppress(psutil.Error):
                    p.kill()
            proc.wait()
    return proc.returncode, out, watch.found, watch.sessions, watch.lines()


#: In the tracking URI on the launcher's command line; no process the launcher starts
#: may show it on its own (a URI can hold a password).
_MARK = "store-pw-hunter2"


def test_torchrun_job_listens_on_loopback_only(tmp_path: Path) -> None:
    uri = f"tracking.uri=sqlite:///{tmp_path / _MARK}.db"
    cmd = [*_turnout(), "train", "tiny", *SHORT, "train.steps=8", "tracking.enabled=false", uri]
    code, out, found, _, lines = _watch([*cmd, "--launcher", "torchrun"], tmp_path)
    assert code == 0, out
    print(f"\nlisteners of the torchrun job:\n{table(found)}")
    # torchrun's ranks were seen: rank 0's store listened
    assert any("turnout.launch.worker" in ln for ln in lines), lines
    assert found, "no listener of the torchrun job was seen"
    exposed = {entry for entry in found if not is_loopback(entry[2])}
    assert not exposed, f"listening beyond loopback:\n{table(exposed)}"
    shown = [ln for ln in lines if _MARK in ln]
    assert not shown, f"the tracking URI on a command line: {shown}"
