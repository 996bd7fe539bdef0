"""The tiny pipeline submitted through the Ray job API (what `ray job submit` does), tracked in a real
MLflow server. Also the model-behaviour check: after a short fine-tuning on synthetic data with
planted structure, bundlerec ranks held-out baskets better than most-popular."""

import json
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT, mlflow_get, mlflow_post

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_pipeline_job_succeeds_and_is_tracked(ray_cluster, mlflow_server, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    runtime_env = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())  # the file users submit with
    runtime_env["working_dir"] = str(ROOT)
    client = JobSubmissionClient(ray_cluster)
    entry = (f"{sys.executable} -m jobs.pipeline --config jobs/configs/tiny.yaml output_root={tmp_path} "
             f"mlflow.tracking_uri={mlflow_server} mlflow.experiment=job-test")
    for attempt in range(30):  # the dashboard's job agent can still be starting on a fresh cluster
        try:
            job = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == 29:
                raise
            time.sleep(2)
    deadline = time.time() + 840
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish"
        time.sleep(3)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "[bundlerec] epoch 1 done" in logs  # rank-0 progress reached the job log

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
