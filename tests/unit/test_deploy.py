"""The deploy/ examples: a `ray up` cluster YAML and a KubeRay RayJob, both for GPU nodes.

Neither can run here, so each is parsed and held to what makes it work: the cluster
YAML validates against the schema Ray's cluster launcher itself uses, both pin the Ray
version we test with, the RayJob's entrypoint is a `turnout train` command whose config
loads, and the GPUs and CPUs they provide fit the preset they run. Both keep strangers
out: token authentication on every node (the RayJob's token from a Kubernetes Secret),
and the RayJob's NetworkPolicy admits its GCS and dashboard ports only from its own pods.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from turnout.config import TurnoutConfig
from turnout.config.load import load_config, split_source

pytestmark = pytest.mark.unit

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RAY_UP = DEPLOY / "ray-cluster-gpu.yaml"
RAY_JOB = DEPLOY / "rayjob-gpu.yaml"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)
    return docs


def _load(path: Path, kind: str | None = None) -> dict[str, Any]:
    """The file's only document, or its one document of ``kind``."""
    docs = _docs(path)
    if kind is None:
        assert len(docs) == 1, [d.get("kind") for d in docs]
        return docs[0]
    (doc,) = [d for d in docs if d.get("kind") == kind]
    return doc


def _train_config(command: str) -> TurnoutConfig:
    """The config a `turnout train ...` command line would run (validated)."""
    argv = shlex.split(command)
    assert argv[:2] == ["turnout", "train"], command
    return load_config(*split_source(argv[2:]))


def test_ray_up_yaml_matches_rays_schema() -> None:
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(_load(RAY_UP), schema)


def test_ray_up_yaml_has_a_cpu_head_and_gpu_workers_that_fit_the_preset() -> None:
    conf = _load(RAY_UP)
    assert conf["cluster_name"] and conf["provider"]["type"] == "aws"
    types = conf["available_node_types"]
    head = conf["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("GPU", 0) == 0
    assert types[head]["resources"].get("CPU") == 0  # no training worker on the head
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no worker type with GPUs"
    # The job the file's header runs (mod-paper) fits the minimum cluster.
    cfg = load_config("mod-paper")
    assert cfg.launch.use_gpu
    gpus = sum(t["resources"]["GPU"] * t["min_workers"] for t in gpu_types.values())
    assert gpus >= cfg.launch.num_workers
    for t in gpu_types.values():
        per_node = t["resources"]["GPU"]
        assert t["resources"]["CPU"] >= per_node * cfg.launch.cpus_per_worker
        assert t["max_workers"] >= t["min_workers"]
    assert conf["max_workers"] >= sum(t["max_workers"] for t in gpu_types.values())


def test_ray_up_yaml_installs_turnout_and_starts_ray_with_token_auth() -> None:
    conf = _load(RAY_UP)
    setup = " ".join(conf["setup_commands"])
    assert f'"ray[default]=={ray.__version__}"' in setup  # the Ray we test with
    assert "-e /home/ubuntu/turnout" in setup
    assert conf["file_mounts"]["/home/ubuntu/turnout"] == "."
    assert "/home/ubuntu/.ray/auth_token" in conf["file_mounts"]
    head = " ".join(conf["head_start_ray_commands"])
    worker = " ".join(conf["worker_start_ray_commands"])
    assert "ray start --head" in head and "--include-dashboard=true" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker


def test_rayjob_runs_turnout_train_on_gpu_workers() -> None:
    job = _load(RAY_JOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    cfg = _train_config(spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the job server
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_pod = head["template"]["spec"]
    assert "nvidia.com/gpu" not in head_pod["containers"][0]["resources"]["limits"]

    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        limits = container["resources"]["limits"]
        per_pod = int(limits["nvidia.com/gpu"])
        assert per_pod > 0
        assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        assert int(limits["cpu"]) >= per_pod * cfg.launch.cpus_per_worker
        assert container["image"] == head_pod["containers"][0]["image"]
        gpus += per_pod * group["minReplicas"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert cfg.launch.use_gpu and gpus >= cfg.launch.num_workers


def test_rayjob_checkpoints_land_on_a_volume_every_pod_mounts() -> None:
    spec = _load(RAY_JOB, "RayJob")["spec"]
    cfg = _train_config(spec["entrypoint"])
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {
            m["mountPath"]: m["name"]
            for m in pod["containers"][0]["volumeMounts"]
            if m["name"] in claims
        }
        for path in (cfg.train.ckpt_dir, cfg.launch.storage_path):
            assert any(path.startswith(f"{mount}/") for mount in mounts), (path, mounts)


def _job_pods(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod template of the RayJob: head, each worker group, the submitter."""
    cluster = spec["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    pods["submitter"] = spec["submitterPodTemplate"]
    return pods


def test_rayjob_pods_authenticate_with_a_token_from_a_secret() -> None:
    spec = _load(RAY_JOB, "RayJob")["spec"]
    secrets = set()
    for name, pod in _job_pods(spec).items():
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (name, env)
            token = env.get("RAY_AUTH_TOKEN", {})
            assert "value" not in token, f"{name}: a literal token in the manifest"
            ref = token["valueFrom"]["secretKeyRef"]
            secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1, secrets  # one cluster, one token
    assert "Secret" not in {d["kind"] for d in _docs(RAY_JOB)}  # created by hand, never shipped


def test_rayjob_network_policy_admits_gcs_and_dashboard_only_from_the_jobs_pods() -> None:
    spec = _load(RAY_JOB, "RayJob")["spec"]
    policy = _load(RAY_JOB, "NetworkPolicy")
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector and "Ingress" in policy["spec"]["policyTypes"]
    for name, pod in _job_pods(spec).items():  # the policy covers every pod of the job
        labels = pod.get("metadata", {}).get("labels", {})
        assert selector.items() <= labels.items(), (name, labels)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    gcs_and_dashboard = {ports["gcs"], ports["dashboard"]}
    admitted_from: list[Any] = []
    for rule in policy["spec"].get("ingress", []):
        rule_ports = {p.get("port") for p in rule.get("ports", [])}
        if rule.get("ports") and not rule_ports & (gcs_and_dashboard | {"gcs", "dashboard"}):
            continue
        peers = rule.get("from")
        assert peers, f"a rule admits the GCS or dashboard from anywhere: {rule}"
        admitted_from.extend(peers)
    assert admitted_from, "nothing may reach the GCS: the job could not run"
    for peer in admitted_from:
        assert set(peer) == {"podSelector"}, peer  # no ipBlock, no other namespace
        assert peer["podSelector"]["matchLabels"] == selector, peer
