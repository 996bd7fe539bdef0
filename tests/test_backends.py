"""The production-shaped stores, for real: MLflow's database on PostgreSQL and its artifacts on S3
(moto in server mode), started by `BACKENDS=postgres-s3 cluster/local.sh start`; the tiny pipeline
submitted with `bundlerec submit` (ray job submit) keeps its prep snapshot and its checkpoints on S3,
registers into the PostgreSQL registry; the registered model loads from the S3-backed artifacts."""

import fnmatch
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT, free_port, require_job_agent, require_system_package, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(900)]

# the RayJob's sizes shrunk to tiny.yaml's (a 2-core box) and the tiny random-init encoder in place of
# MiniLM (the subject here is the stores, not the weights: MiniLM's ZeRO checkpoints are 345 MB of
# uploads to the local S3 server); everything else is the entrypoint's own
SMALL = ["data.synthetic.n_users=300", "data.synthetic.n_items=120", "data.synthetic.n_events=6000",
         "data.synthetic.n_bundles=40", "data.history_len=6", "data.item_max_tokens=24", "data.num_shards=2",
         "model.sampled_negatives=8", "train.epochs=1", "train.max_steps_per_epoch=4",
         "train.micro_batch=8"]


def _image_tree(dst: Path) -> Path:
    """A copy of the project as the image holds it: what `COPY . /home/ray/bundlerec` takes, the
    .dockerignore patterns left out (and the virtual environment and session data never in it)."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignore(d: str, names: list[str]) -> set:
        rel = os.path.relpath(d, ROOT)
        out = set()
        for n in names:
            path = n if rel == "." else os.path.join(rel, n)
            # Docker's rules: a pattern is relative to the context root; "**/" matches any depth
            if any(fnmatch.fnmatch(path, p) or (p.startswith("**/") and fnmatch.fnmatch(n, p[3:])) for p in patterns):
                out.add(n)
        return out

    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)
    assert (dst / "datasets/steam_bundles").is_dir() and (dst / "bundlerec/data/prep.py").exists()
    assert not (dst / ".git").exists() and not (dst / ".venv").exists() and not (dst / "runs").exists()
    return dst


@pytest.fixture(scope="module")
def backends(ray_cluster, tmp_path_factory):
    require_system_package(bool(list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), "postgresql")
    state = tmp_path_factory.mktemp("backends")
    pg_data = tempfile.mkdtemp(prefix="bundlerec-pg-")  # reachable by the postgres account (tmp dirs are 0700)
    os.chmod(pg_data, 0o755)
    ports = {"MLFLOW_PORT": free_port(), "PG_PORT": free_port(), "S3_PORT": free_port()}
    env = {**os.environ, "BUNDLEREC_STATE": str(state), "BACKENDS": "postgres-s3", "PG_DATA": f"{pg_data}/db",
           "DASHBOARD_PORT": ray_cluster.rsplit(":", 1)[1], **{k: str(v) for k, v in ports.items()},
           "S3_BUCKET": "bundlerec-test"}
    run = subprocess.run(["cluster/local.sh", "start"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    try:
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Ray already running" in run.stdout  # the suite's cluster is reused, and left alone by stop
        s3_env = dict(line.split("=", 1) for line in
                      " ".join(ln[len("export "):] for ln in (state / "s3.env").read_text().splitlines()).split())
        yield {"mlflow": f"http://127.0.0.1:{ports['MLFLOW_PORT']}", "s3_env": s3_env, "state": state,
               "pg": f"postgresql://mlflow@127.0.0.1:{ports['PG_PORT']}/mlflow", "bucket": "bundlerec-test",
               "log": run.stdout, "dashboard": ray_cluster}
    finally:
        stop = subprocess.run(["cluster/local.sh", "stop"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert "stopped Ray" not in stop.stdout, stop.stdout
        import shutil

        shutil.rmtree(pg_data, ignore_errors=True)


def test_pipeline_on_s3_storage_and_a_postgres_registry_through_ray_job_submit(backends, ray_cluster, tmp_path,
                                                                               monkeypatch):
    import boto3
    import mlflow
    import psycopg
    require_job_agent()

    s3_env, bucket = backends["s3_env"], backends["bucket"]
    # the RayJob's exact entrypoint (cluster/kuberay/rayjob.yaml), run as KubeRay runs it: in the image's
    # tree (a copy of the project as .dockerignore leaves it), its runtime env, the user key as the
    # mounted Secret file, S3 credentials in the environment; only the addresses (bucket, tracking
    # server), the GPU switch and the sizes (a 2-core box) are overridden
    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())["spec"]
    tree = _image_tree(tmp_path / "image")
    key = tmp_path / "secret" / "key"
    key.parent.mkdir()
    key.write_text(secrets.token_hex(32))
    key.chmod(0o440)
    entry = (job["entrypoint"].replace("s3://bundlerec/", f"s3://{bucket}/")
             .replace("mlflow.tracking_uri=http://mlflow.mlflow.svc:5000", f"mlflow.tracking_uri={backends['mlflow']}")
             .replace("train.use_gpu=true", "train.use_gpu=false")
             .replace("serve.user_key_file=/etc/bundlerec/user-key/key", f"serve.user_key_file={key}")).split()
    assert entry[:3] == ["python", "-m", "jobs.pipeline"] and f"s3://{bucket}/run/results.json" in " ".join(entry)
    renv = tmp_path / "runtime_env.yaml"
    env_vars = {**yaml.safe_load(job["runtimeEnvYAML"])["env_vars"], **s3_env,
                **{k: v for k, v in yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())["env_vars"].items()}}
    renv.write_text(yaml.safe_dump({"working_dir": str(tree), "env_vars": env_vars}))
    prefix = f"s3://{bucket}/run"
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster,
           "--runtime-env", str(renv), "--", *entry, *SMALL, *tiny_overrides(), "mlflow.experiment=backends", "serve.model_name=bundlerec-s3"]
    for attempt in range(12):  # the dashboard's job agent can still be starting on a loaded box
        r = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **s3_env}, capture_output=True, text=True, timeout=840)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
            break
        time.sleep(10)
    (tmp_path / "job.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]

    # prep's committed snapshot and the checkpoints are objects in the bucket, nothing on local disk
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    keys = [o["Key"] for page in boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).get_paginator(
        "list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
    def s3_get(key: str) -> bytes:
        return boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).get_object(Bucket=bucket, Key=key)["Body"].read()

    manifest = json.loads(s3_get("run/prep/manifest.json"))
    assert all(f"run/prep/{manifest['snapshot']}/{rel}" in keys for rel in manifest["files"])
    assert any(rel.startswith("examples/train/") for rel in manifest["files"])
    assert any(k.startswith("run/ray_results/") and "_bundlerec_manifest" in k for k in keys)  # verified checkpoints
    # the export (committed by its manifest, pricing included), results.json and summary.json too
    from bundlerec.integrity import verify

    results = json.loads(s3_get("run/results.json"))
    assert results["export_dir"] == f"{prefix}/export" and verify(results["export_dir"]) == (True, "ok")
    assert "run/export/item_index.npy" in keys and "run/export/user_tower.safetensors" in keys
    summary = json.loads(s3_get("run/summary.json"))
    assert summary["export_dir"] == f"{prefix}/export" and "deploy" not in summary["stages"]  # the RayJob does not deploy
    assert not list(tmp_path.glob("s3:*")) and not list(tree.rglob("results.json"))  # nothing written locally

    # the registry lives in PostgreSQL, the model's files in the bucket
    with psycopg.connect(backends["pg"]) as conn:
        versions = conn.execute("SELECT version FROM model_versions WHERE name = 'bundlerec-s3'").fetchall()
        aliases = conn.execute("SELECT alias, version FROM registered_model_aliases WHERE name = 'bundlerec-s3'").fetchall()
    assert versions == [(1,)] and aliases == [("champion", 1)]
    assert any(k.startswith("mlflow/") and k.endswith("export/MANIFEST.json") for k in keys)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(backends["mlflow"])
    rec = mlflow.pyfunc.load_model("models:/bundlerec-s3@champion").unwrap_python_model().rec  # verified export
    assert len(rec.item_ids) == 120
    _the_rayservice_app_serves_the_champion(backends, key, tmp_path)

    # a sweep on the same bucket: Tune's state, the trials' checkpoints and exports, sweep.json and the
    # best trial's export (amended with pricing, evaluated, registered) are bucket objects
    sweep = [str(Path(sys.executable).with_name("bundlerec")), "submit", "--address", ray_cluster,
             "--runtime-env", str(renv), "pipeline", "--config", "jobs/configs/tiny.yaml",
             f"output_root={tmp_path}", f"data.output_dir={prefix}/prep", f"train.storage_path={prefix}/ray_results",
             f"results_path={prefix}/results.json", f"tune.storage_path={prefix}/tune",
             f"mlflow.tracking_uri={backends['mlflow']}", "mlflow.experiment=backends", "serve.model_name=bundlerec-s3",
             "train.epochs=1", f"serve.user_key_file={key}", "stages=[tune,register]", "tune.num_samples=1",
             *tiny_overrides()]
    r = subprocess.run(sweep, cwd=ROOT, env={**os.environ, **s3_env}, capture_output=True, text=True, timeout=840)
    (tmp_path / "sweep.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    results = json.loads(s3_get("run/results.json"))
    best = results["best_trial"]["export_dir"]
    assert best.startswith(f"{prefix}/tune/tiny-sweep/exports/") and results["export_dir"] == best
    assert verify(best) == (True, "ok") and "pricing.json" in json.loads(s3_get(best[len(f"s3://{bucket}/"):]
                                                                                 + "/MANIFEST.json"))["files"]
    keys = [o["Key"] for page in boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).get_paginator(
        "list_objects_v2").paginate(Bucket=bucket, Prefix="run/tune/") for o in page.get("Contents", [])]
    assert "run/tune/tiny-sweep/sweep.json" in keys and "run/tune/tiny-sweep/bundlerec_sweep_state.json" in keys
    assert any(k.startswith("run/tune/tiny-sweep/tuner/") for k in keys)  # Tune's own state (resumable)
    with psycopg.connect(backends["pg"]) as conn:
        assert conn.execute("SELECT count(*) FROM model_versions WHERE name = 'bundlerec-s3'").fetchone() == (2,)


def _the_rayservice_app_serves_the_champion(backends: dict, key: Path, tmp_path: Path) -> None:
    """The RayService's serveConfigV2 (cluster/kuberay/rayservice.yaml), given to this Ray cluster's
    Serve REST API as KubeRay gives it to its own: the application's args with only the addresses and
    file paths replaced (the registry, the mounted Secrets as files, the bucket), S3 credentials in the
    environment as the pods' envFrom gives them, sizes for a 2-core box. It serves the champion, and a
    shopper of the pseudonymized export is found by their clear id (the shared user-key Secret)."""
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from bundlerec.data.examples import load_split
    from bundlerec.serving.auth import write_token_file
    from bundlerec.client import http_json
    from bundlerec.serving.deploy import wait_ready
    from tests.support import free_port

    service = yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    conf = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = conf["applications"][0]
    token = write_token_file(str(tmp_path / "api" / "tokens"))
    admin = write_token_file(str(tmp_path / "admin" / "tokens"))
    args = app["args"]
    assert set(args) >= {"model_uri", "tracking_uri", "auth_token_file", "admin_token_file", "user_key_file", "event_log_dir"}
    args.update({"model_uri": "models:/bundlerec-s3@champion", "tracking_uri": backends["mlflow"],
                 "auth_token_file": str(tmp_path / "api" / "tokens"), "admin_token_file": str(tmp_path / "admin" / "tokens"),
                 "user_key_file": str(key),
                 "event_log_dir": f"s3://{backends['bucket']}/online", "model_cache_dir": str(tmp_path / "models")})
    args.pop("tracking_credentials_file")  # the local tracking server has no users
    from bundlerec.runtime import WORKER_ENV

    app["runtime_env"] = {"env_vars": {**WORKER_ENV, **backends["s3_env"]}}
    for d in app["deployments"]:
        d["autoscaling_config"] = {**d["autoscaling_config"], "min_replicas": 1, "max_replicas": 1}
        d["ray_actor_options"] = {**d["ray_actor_options"], "num_cpus": 1}
    port = free_port()
    conf["http_options"] = {"host": "127.0.0.1", "port": port}
    base = f"http://127.0.0.1:{port}"
    client = ServeSubmissionClient(backends["dashboard"])
    try:
        client.deploy_applications(conf)
        wait_ready(base, 300)
        user = str(load_split(f"s3://{backends['bucket']}/run/prep", "test").user_id.iloc[0])
        r = http_json(f"{base}/v1/recommendations", {"user_id": user, "k": 3}, token=token)
        assert len(r["items"]) == 3 and not r["cold_start"] and r["model"]["alias"] == "champion", r
        b = http_json(f"{base}/v1/bundles", {"user_id": user, "n": 1, "max_size": 3}, token=token)
        assert b["bundles"] and not b["cold_start"], b
        # the explore routes (any shopper's history) take the admin Secret's tokens, not the API's
        import urllib.error

        assert http_json(f"{base}/v1/explore/users?n=2", token=admin)["users"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            http_json(f"{base}/v1/explore/users?n=2", token=token)
        assert refused.value.code == 403
    finally:
        serve.shutdown()
