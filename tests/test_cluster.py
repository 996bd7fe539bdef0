"""Cluster manifests parse, carry the required fields, and agree with pyproject's Ray pin."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_MINOR = re.search(r'"ray\[[^\]]*\]>=(\d+\.\d+)', (ROOT / "pyproject.toml").read_text()).group(1)
KUBERAY = sorted(p for p in (ROOT / "cluster/kuberay").glob("*.yaml") if "kind: Ray" in p.read_text())


def _cluster_spec(doc):
    return {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)


def _pods(spec):
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _images(spec):
    return [c["image"] for p in _pods(spec) for c in p["spec"]["containers"]]


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
        # tokens from the mounted Secret file (re-read on rotation), not an environment variable
        token_file = serve["applications"][0]["args"]["auth_token_file"]
        for p in _pods(spec):
            vols = {v["name"]: v for v in p["spec"]["volumes"]}
            for c in p["spec"]["containers"]:
                assert "BUNDLEREC_API_TOKENS" not in [e["name"] for e in c.get("env", [])]
                m = [m for m in c["volumeMounts"] if token_file.startswith(m["mountPath"] + "/")]
                assert len(m) == 1 and m[0]["readOnly"] and "secret" in vols[m[0]["name"]]
    # least privilege: Ray token auth, non-root pods without privilege escalation
    assert spec["authOptions"] == {"mode": "token"}
    for p in _pods(spec):
        sc = p["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["seccompProfile"]["type"] == "RuntimeDefault"
        for c in p["spec"]["containers"]:
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    if doc["kind"] in ("RayCluster", "RayService"):  # worker groups between min and max replicas
        assert spec["enableInTreeAutoscaling"] is True
        assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"])
    assert "LoadBalancer" not in path.read_text() and "NodePort" not in path.read_text()
    if doc["kind"] == "RayCluster":
        gpu = [g for g in spec["workerGroupSpecs"]
               if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu, "the RayCluster needs a GPU worker group"


def test_network_policy_admits_only_the_clusters_own_pods_and_the_ingress_to_serve():
    doc = yaml.safe_load((ROOT / "cluster/kuberay/networkpolicy.yaml").read_text())
    assert doc["kind"] == "NetworkPolicy" and doc["spec"]["policyTypes"] == ["Ingress"]
    names = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in KUBERAY}
    selected = set(doc["spec"]["podSelector"]["matchExpressions"][0]["values"])
    assert names <= selected  # every Ray cluster of the manifests is covered
    own, ingress = doc["spec"]["ingress"]
    assert set(own["from"][0]["podSelector"]["matchExpressions"][0]["values"]) == selected and "ports" not in own
    assert ingress["ports"] == [{"port": 8000, "protocol": "TCP"}]  # only Serve from outside the cluster


def test_image_is_built_from_the_lock_and_runs_as_non_root():
    docker = (ROOT / "cluster/Dockerfile").read_text()
    assert "requirements.lock" in docker and "--no-deps" in docker
    users = re.findall(r"^USER (\S+)", docker, re.M)
    assert users and users[-1] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    for secret_or_state in (".git", ".venv", "runs", "*.db", "**/api_token", "**/user_key", "*.env"):
        assert secret_or_state in ignored, secret_or_state
    assert "*.env" in (ROOT / ".gitignore").read_text().split()  # MLflow identities (setup_basic_auth)
    # the cluster recipe: the admin password is never on a command line, its files never in the project
    recipe = (ROOT / "cluster/kuberay/mlflow.yaml").read_text()
    assert "<admin-password>" not in recipe and "os.environ['MLFLOW_ADMIN_PASSWORD']" in recipe
    assert "', '.')" not in recipe and "mktemp -d" in recipe


def test_image_and_launcher_match_the_ray_pin():
    docker = (ROOT / "cluster/Dockerfile").read_text()
    assert f"rayproject/ray:{RAY_MINOR}." in docker
    launcher = yaml.safe_load((ROOT / "cluster/launcher-gpu.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in launcher
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert any("--dashboard-host=127.0.0.1" in c for c in launcher["head_start_ray_commands"])
    # token authentication on every node: each `ray start` with it, the token file copied to each node
    starts = [c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts), starts
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]


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


def test_an_open_endpoint_beyond_loopback_is_refused_at_deploy():
    """jobs.deploy builds the Serve config: a proxy listening beyond this machine needs serve.auth."""
    from bundlerec.config import load_config
    from bundlerec.serving.deploy import serve_config

    with pytest.raises(ValueError, match="serve.auth=true"):
        serve_config(load_config(None, ["serve.url=http://0.0.0.0:8000", "serve.auth=false"]))
    conf = serve_config(load_config(None, ["serve.url=http://0.0.0.0:8000", "serve.auth=true"]))
    assert conf["http_options"]["host"] == "0.0.0.0" and conf["applications"][0]["args"]["auth"] is True
    assert serve_config(load_config(None, ["serve.auth=false"]))["http_options"]["host"] == "127.0.0.1"
    kuberay = yaml.safe_load(yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())["spec"]["serveConfigV2"])
    assert kuberay["applications"][0]["args"]["auth"] is True  # the cluster manifest never serves openly


def test_mlflow_on_the_cluster_requires_users_and_jobs_and_serve_use_their_own():
    """cluster/kuberay/mlflow.yaml runs MLflow's basic-auth app with every secret from a Secret; the
    training RayJob writes as the trainer identity, the RayService reads as the serving identity."""
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "cluster/kuberay/mlflow.yaml").read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert "--app-name basic-auth" in c["args"][0] and docs["Service"]["spec"]["type"] == "ClusterIP"
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "BACKEND_STORE_URI", "AUTH_DATABASE_URI"} <= set(secrets)
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["allowPrivilegeEscalation"] is False
    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())
    for p in _pods(_cluster_spec(job)):
        assert all({"secretRef": {"name": "bundlerec-mlflow-trainer"}} in x["envFrom"] for x in p["spec"]["containers"])
    service = yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    creds = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["tracking_credentials_file"]
    for p in _pods(_cluster_spec(service)):
        vols = {v["name"]: v for v in p["spec"]["volumes"]}
        for x in p["spec"]["containers"]:
            m = [m for m in x["volumeMounts"] if creds.startswith(m["mountPath"] + "/")]
            assert len(m) == 1 and m[0]["readOnly"] and vols[m[0]["name"]]["secret"]["secretName"] == "bundlerec-mlflow-serving"


def _mounted_secret(pod: dict, path: str) -> str:
    """The Secret a container of ``pod`` reads ``path`` from (a read-only mount), or ''."""
    vols = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    names = set()
    for c in pod["spec"]["containers"]:
        m = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"] + "/") and m.get("readOnly")]
        names |= {vols[x["name"]]["secret"]["secretName"] for x in m if "secret" in vols[x["name"]]}
    return names.pop() if len(names) == 1 else ""


def test_the_job_and_the_service_share_the_user_key_and_the_stores_credentials():
    """The RayJob trains, evaluates and registers with everything in the bucket and no deploy; it and
    the RayService read the user-pseudonym key from one Secret at the path their args name, S3
    credentials from a Secret, run the image cluster/Dockerfile builds, and GPU pods tolerate the taint."""
    tag = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", (ROOT / "cluster/Dockerfile").read_text()).group(1)
    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())
    args = dict(a.split("=", 1) for a in job["spec"]["entrypoint"].split() if "=" in a)
    assert args["stages"] == "[prep,train,register]"  # the job's cluster is deleted: serving is the RayService's
    for k in ("data.output_dir", "train.storage_path", "tune.storage_path", "results_path"):
        assert args[k].startswith("s3://"), k
    config = yaml.safe_load((ROOT / job["spec"]["entrypoint"].split("--config ")[1].split()[0]).read_text())
    assert (ROOT / config["pricing"]["data_dir"]).is_dir()  # an input of the image (not .dockerignored)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(config["pricing"]["data_dir"].split("/")[0] == i for i in ignored)
    service = yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    for doc, key_path in ((job, args["serve.user_key_file"]), (service, app["user_key_file"])):
        spec = _cluster_spec(doc)
        assert set(_images(spec)) == {tag}
        for pod in _pods(spec):
            assert _mounted_secret(pod, key_path) == "bundlerec-user-key", doc["kind"]
            assert all({"secretRef": {"name": "bundlerec-s3"}} in c.get("envFrom", []) for c in pod["spec"]["containers"])
            gpu = any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in pod["spec"]["containers"])
            tolerates = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"].get("tolerations", [])
            assert tolerates or not gpu, doc["kind"]
    mlflow_image = {c["image"] for d in yaml.safe_load_all((ROOT / "cluster/kuberay/mlflow.yaml").read_text())
                    if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]}
    assert mlflow_image == {tag}
