"""Cluster manifests parse, carry the required fields, and agree with pyproject's Ray pin."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_MINOR = re.search(r'"ray\[[^\]]*\]>=(\d+\.\d+)', (ROOT / "pyproject.toml").read_text()).group(1)
KUBERAY = sorted((ROOT / "cluster/kuberay").glob("*.yaml"))


def _cluster_spec(doc):
    return {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)


def _images(spec):
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c["image"] for p in pods for c in p["spec"]["containers"]]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = _cluster_spec(doc)
    assert spec["rayVersion"].startswith(RAY_MINOR + ".")
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # nothing public by default
    assert spec["workerGroupSpecs"] and all(g["template"]["spec"]["containers"] for g in spec["workerGroupSpecs"])
    assert all(img for img in _images(spec))
    if doc["kind"] == "RayJob":
        assert "jobs.pipeline" in doc["spec"]["entrypoint"]
    if doc["kind"] == "RayService":
        serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
        assert serve["applications"][0]["import_path"] == "bundlerec.serving.app:build_app"
        assert serve["applications"][0]["args"]["auth"] is True  # never an open endpoint on a cluster
        envs = [e["name"] for p in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
                for c in p["spec"]["containers"] for e in c.get("env", [])]
        assert envs.count("BUNDLEREC_API_TOKENS") == 1 + len(spec["workerGroupSpecs"])
    assert "LoadBalancer" not in path.read_text() and "NodePort" not in path.read_text()
    if doc["kind"] == "RayCluster":
        gpu = [g for g in spec["workerGroupSpecs"]
               if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu, "the RayCluster needs a GPU worker group"


def test_image_and_launcher_match_the_ray_pin():
    docker = (ROOT / "cluster/Dockerfile").read_text()
    assert f"rayproject/ray:{RAY_MINOR}." in docker
    launcher = yaml.safe_load((ROOT / "cluster/launcher-gpu.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in launcher
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert any("--dashboard-host=127.0.0.1" in c for c in launcher["head_start_ray_commands"])


def test_serve_config_is_valid_for_ray_serve():
    from ray.serve.schema import ServeDeploySchema

    conf = yaml.safe_load((ROOT / "serve/config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(conf) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(conf)
    assert schema.http_options.host == "127.0.0.1"
    dep = schema.applications[0].deployments[0]
    assert dep.max_queued_requests > 0 and dep.backpressure_config.status_code == 503  # no unbounded queue
    assert dep.backpressure_config.retry_after_s
    local = (ROOT / "cluster/local.sh").read_text()
    assert "--dashboard-host=127.0.0.1" in local and "--host 127.0.0.1" in local
    assert conf["applications"][0]["import_path"] == "bundlerec.serving.app:build_app"
