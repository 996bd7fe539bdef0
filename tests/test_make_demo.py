"""The README's quick start, run for real: `make demo` (the Makefile target: services check, then
`ray job submit ... jobs.pipeline`) with the tiny config, against this suite's Ray cluster and MLflow
server, tracked in MLflow. Also the model-behaviour check: after a short fine-tuning of MiniLM on
synthetic data with planted structure, bundlerec ranks held-out baskets better than most-popular."""

import json
import os
import subprocess
import time
from urllib.parse import urlparse

import pytest

from tests.conftest import ROOT, mlflow_get, mlflow_post

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_make_demo_runs_the_pipeline_job_and_tracks_it(ray_cluster, mlflow_server, tmp_path):
    env = {**os.environ, "DASHBOARD_PORT": str(urlparse(ray_cluster).port), "MLFLOW_PORT": str(urlparse(mlflow_server).port)}
    cmd = ["make", "demo", "DEMO_CONFIG=jobs/configs/tiny.yaml", f"DEMO_ROOT={tmp_path}",
           f"DEMO_ARGS=mlflow.tracking_uri={mlflow_server} mlflow.experiment=job-test"]
    for attempt in range(10):  # the dashboard's job agent can still be starting on a fresh cluster
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
            break
        time.sleep(5)
    logs = r.stdout + r.stderr
    (tmp_path / "make_demo.log").write_text(logs)  # the whole output, for a failure's post-mortem
    assert r.returncode == 0, logs[-4000:]
    assert "already running" in logs  # local.sh reused the suite's services instead of starting its own
    assert "[bundlerec] epoch 1 done" in logs  # rank-0 progress reached the job log
    assert "demo wall time:" in logs

    summary = json.loads((tmp_path / "runs/tiny/summary.json").read_text())
    assert set(summary["metrics"]) == {"bundlerec", "popular", "itemknn", "zeroshot"}
    # model behaviour: fine-tuned beats most-popular on the held-out baskets
    assert summary["metrics"]["bundlerec"]["ndcg@10"] > summary["metrics"]["popular"]["ndcg@10"]

    run = mlflow_get(mlflow_server, "runs/get", run_id=summary["run_id"])["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    for method in ("bundlerec", "popular", "itemknn", "zeroshot"):
        assert f"test/{method}/ndcg_at_10" in metrics and f"test/{method}/recall_at_20" in metrics
    assert metrics["test_ndcg_at_10"] == pytest.approx(summary["metrics"]["bundlerec"]["ndcg@10"])
    assert "val_ndcg_at_10" in metrics and "samples_per_s" in metrics
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.zero_stage"] == "2" and params["model.name_or_path"] == "all-MiniLM-L6-v2"
    hist = mlflow_get(mlflow_server, "metrics/get-history", run_id=summary["run_id"], metric_key="train_loss")
    assert sorted(m["step"] for m in hist["metrics"]) == [1, 2]  # per-epoch metrics from rank 0
    arts = mlflow_get(mlflow_server, "artifacts/list", run_id=summary["run_id"], path="model")
    assert {"model/item_index.npy", "model/encoder"} <= {f["path"] for f in arts["files"]}
    found = mlflow_post(mlflow_server, "runs/search", {"experiment_ids": [run["info"]["experiment_id"]]})
    assert [r["info"]["run_id"] for r in found["runs"]] == [summary["run_id"]]
