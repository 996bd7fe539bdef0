"""The production-shaped stores, for real: MLflow's database on PostgreSQL and its artifacts on S3
(moto in server mode), started by `BACKENDS=postgres-s3 cluster/local.sh start`; the tiny pipeline
submitted with `bundlerec submit` (ray job submit) keeps its prep snapshot and its checkpoints on S3,
registers into the PostgreSQL registry; the registered model loads from the S3-backed artifacts."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, STEAM, free_port, require_system_package

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


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
                      " ".join(l[len("export "):] for l in (state / "s3.env").read_text().splitlines()).split())
        yield {"mlflow": f"http://127.0.0.1:{ports['MLFLOW_PORT']}", "s3_env": s3_env, "state": state,
               "pg": f"postgresql://mlflow@127.0.0.1:{ports['PG_PORT']}/mlflow", "bucket": "bundlerec-test",
               "log": run.stdout}
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

    s3_env, bucket = backends["s3_env"], backends["bucket"]
    renv = tmp_path / "runtime_env.yaml"
    base = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())
    base["working_dir"] = str(ROOT)
    base["env_vars"] = {**base["env_vars"], **s3_env}  # the job's S3 client settings (IAM/IRSA on a cluster)
    renv.write_text(yaml.safe_dump(base))
    prefix = f"s3://{bucket}/run"
    cmd = [str(Path(sys.executable).with_name("bundlerec")), "submit", "--address", ray_cluster,
           "--runtime-env", str(renv), "pipeline", "--config", "jobs/configs/tiny.yaml",
           f"output_root={tmp_path}", f"data.output_dir={prefix}/prep", f"train.storage_path={prefix}/ray_results",
           f"results_path={prefix}/results.json", f"tune.storage_path={prefix}/tune",
           f"mlflow.tracking_uri={backends['mlflow']}", "mlflow.experiment=backends", "serve.model_name=bundlerec-s3",
           "train.epochs=1", "stages=[prep,train,register]"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **s3_env}, capture_output=True, text=True, timeout=840)
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
    assert json.loads(s3_get("run/summary.json"))["export_dir"] == f"{prefix}/export"
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("s3:*"))
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("results.json"))

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

    # a sweep on the same bucket: Tune's state, the trials' checkpoints and exports, sweep.json and the
    # best trial's export (amended with pricing, evaluated, registered) are bucket objects
    sweep = cmd[:cmd.index("stages=[prep,train,register]")] + ["stages=[tune,register]", "tune.num_samples=1",
                                                                f"pricing.data_dir={STEAM}"]
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
