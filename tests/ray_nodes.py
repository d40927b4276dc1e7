"""A real two-node Ray cluster on this machine, started with ``ray start``, for the e2e tier.

Preferred layout: two network namespaces joined by a veth pair, each node with its own
address (head 10.211.0.1, worker 10.211.0.2), so everything between the nodes, the
gloo collectives included, crosses the veth. That needs root (CAP_NET_ADMIN) and the
``ip`` tool; without them the two raylets run on this host's network with distinct
loopback node addresses (127.0.0.1 and 127.0.0.2). Either way it is two raylets, and
the cluster uses Ray's token authentication with a token of its own.

Clean-up never uses ``ray stop`` (it kills every Ray process on the host, other
people's too): it ends, by pid, the processes of our namespaces and the process trees
whose command line names our own temp folders or our GCS address, then deletes the
namespaces and the veth.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from turnout.parallel.dist import free_port

HEAD_IP, WORKER_IP = "10.211.0.1", "10.211.0.2"
LOOP_HEAD_IP, LOOP_WORKER_IP = "127.0.0.1", "127.0.0.2"
START_TIMEOUT_S = 60.0


def ray_cli() -> list[str]:
    """Ray's command line from this interpreter (the venv's, on every node)."""
    return [sys.executable, "-m", "ray.scripts.scripts"]


def base_env() -> dict[str, str]:
    """The environment every node and client runs with (token auth, this venv first)."""
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONWARNINGS"] = "ignore"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"
    return env


@dataclass
class Cluster:
    """Addresses of a running test cluster and how to run a command on its head node."""

    netns: bool
    head_ip: str
    worker_ip: str
    gcs_port: int
    dashboard_port: int
    token: str
    namespaces: tuple[str, str] = ("", "")
    veth: tuple[str, str] = ("", "")
    temp_dirs: list[str] = field(default_factory=list)
    client_port: int = field(default_factory=free_port)

    @property
    def gcs(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = base_env()
        env["RAY_AUTH_TOKEN"] = self.token
        env.update(extra)
        return env

    def on_head(self, cmd: list[str]) -> list[str]:
        """``cmd`` as run on the head node (inside its namespace when there is one)."""
        return ["ip", "netns", "exec", self.namespaces[0], *cmd] if self.netns else cmd

    def on_worker(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[1], *cmd] if self.netns else cmd

    def veth_bytes(self, side: int) -> int:
        """Bytes received plus sent so far on one end of the veth (netns layout only)."""
        ns, dev = self.namespaces[side], self.veth[side]
        stats = Path(f"/sys/class/net/{dev}/statistics")
        cmd = ["ip", "netns", "exec", ns, "cat", str(stats / "rx_bytes"), str(stats / "tx_bytes")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return sum(int(v) for v in out.split())


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def make_namespaces(tag: str) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """Two namespaces joined by a veth (HEAD_IP, WORKER_IP); None when not permitted
    (or when TURNOUT_TEST_LOOPBACK_NODES=1 asks for the loopback layout)."""
    if os.environ.get("TURNOUT_TEST_LOOPBACK_NODES") == "1" or shutil.which("ip") is None:
        return None
    ns = (f"tnh{tag}", f"tnw{tag}")
    veth = (f"tvh{tag}", f"tvw{tag}")
    if _ip("netns", "add", ns[0]).returncode != 0:
        return None
    steps = [
        ("netns", "add", ns[1]),
        ("link", "add", veth[0], "type", "veth", "peer", "name", veth[1]),
        ("link", "set", veth[0], "netns", ns[0]),
        ("link", "set", veth[1], "netns", ns[1]),
        ("-n", ns[0], "addr", "add", f"{HEAD_IP}/24", "dev", veth[0]),
        ("-n", ns[1], "addr", "add", f"{WORKER_IP}/24", "dev", veth[1]),
        ("-n", ns[0], "link", "set", veth[0], "up"),
        ("-n", ns[1], "link", "set", veth[1], "up"),
        ("-n", ns[0], "link", "set", "lo", "up"),
        ("-n", ns[1], "link", "set", "lo", "up"),
    ]
    for step in steps:
        if _ip(*step).returncode != 0:
            remove_namespaces(ns, veth)
            return None
    # `ip netns exec` also needs to make a mount namespace: try it once.
    if _ip("netns", "exec", ns[1], sys.executable, "-c", "pass").returncode != 0:
        remove_namespaces(ns, veth)
        return None
    return ns, veth


def remove_namespaces(ns: tuple[str, str], veth: tuple[str, str]) -> None:
    for name in ns:
        if name:
            _ip("netns", "delete", name)  # takes its end of the veth (and so the pair) along
    for dev in veth:
        if dev:
            _ip("link", "delete", dev)  # only if one was left in this namespace


def _ray_start(cluster: Cluster, head: bool, temp_dir: str) -> None:
    common = [
        "--num-cpus=1",
        "--object-store-memory=100000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    if head:
        cmd = cluster.on_head(
            [
                *ray_cli(),
                "start",
                "--head",
                f"--node-ip-address={cluster.head_ip}",
                f"--port={cluster.gcs_port}",
                "--include-dashboard=true",
                f"--dashboard-host={cluster.head_ip}",
                f"--dashboard-port={cluster.dashboard_port}",
                f"--ray-client-server-port={cluster.client_port}",
                *common,
            ]
        )
    else:
        cmd = cluster.on_worker(
            [
                *ray_cli(),
                "start",
                f"--address={cluster.gcs}",
                f"--node-ip-address={cluster.worker_ip}",
                *common,
            ]
        )
    proc = subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{proc.stdout}\n{proc.stderr}")


def alive_nodes(cluster: Cluster) -> int:
    """Nodes the head's GCS lists as active (``ray status``)."""
    cmd = cluster.on_head([*ray_cli(), "status", f"--address={cluster.gcs}"])
    proc = subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=60)
    active = proc.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if " node_" in line)


def start_cluster() -> Cluster:
    """Head + worker node (see the module doc); the caller must :func:`stop_cluster` it."""
    tag = str(os.getpid() % 100000)
    made = make_namespaces(tag)
    if made is not None:
        ns, veth = made
        cluster = Cluster(True, HEAD_IP, WORKER_IP, 6379, 8265, secrets.token_hex(32), ns, veth)
    else:
        cluster = Cluster(
            False, LOOP_HEAD_IP, LOOP_WORKER_IP, free_port(), free_port(), secrets.token_hex(32)
        )
    try:
        # Short folders: Ray's unix sockets live under them (108-byte path limit).
        cluster.temp_dirs = [tempfile.mkdtemp(prefix="tnr", dir="/tmp") for _ in range(2)]
        _ray_start(cluster, True, cluster.temp_dirs[0])
        _ray_start(cluster, False, cluster.temp_dirs[1])
        deadline = time.monotonic() + START_TIMEOUT_S
        while alive_nodes(cluster) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker node did not join the head within 60 s")
            time.sleep(1.0)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _our_processes(cluster: Cluster) -> list[psutil.Process]:
    """Every process of this cluster: in our namespaces, naming our folders, or the head's
    Ray Client server (on our port)."""
    marks = [d for d in cluster.temp_dirs if d]
    client = f"--port={cluster.client_port}"
    roots: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        args = proc.info["cmdline"] or []
        cmdline = " ".join(args)
        if any(m in cmdline for m in marks) or (
            "ray.util.client.server" in cmdline and client in args
        ):
            roots[proc.pid] = proc
    if cluster.netns:
        for ns in cluster.namespaces:
            out = _ip("netns", "pids", ns).stdout
            for pid in out.split():
                with contextlib.suppress(psutil.NoSuchProcess):
                    roots[int(pid)] = psutil.Process(int(pid))
    found = dict(roots)
    for proc in roots.values():
        try:
            for child in proc.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_cluster(cluster: Cluster, grace_s: float = 5.0) -> None:
    """End every process of the cluster (SIGTERM, then SIGKILL), delete its namespaces."""
    procs = _our_processes(cluster)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5.0)
    if cluster.netns:
        remove_namespaces(cluster.namespaces, cluster.veth)
    for folder in cluster.temp_dirs:
        shutil.rmtree(folder, ignore_errors=True)
