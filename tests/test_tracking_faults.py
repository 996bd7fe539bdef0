"""MLflow faults against a real `mlflow server`: down at start -> a clear error before any compute;
an outage mid-run -> metrics are buffered and arrive once the server is back (none lost, none doubled)."""

import subprocess
import sys
import time

import pytest

from tests.support import ROOT, free_port, mlflow_get, start_mlflow, stop_mlflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_tracking_server_down_fails_fast_before_compute(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    out_dir = tmp_path / "prep"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "jobs/configs/tiny.yaml",
                        f"mlflow.tracking_uri={dead}", f"data.output_dir={out_dir}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"MLflow tracking server {dead} is not reachable" in r.stderr and "make services" in r.stderr
    assert "Traceback" not in r.stderr  # one clear line, not a stack
    assert not out_dir.exists()  # nothing ran: no prep output, no Ray started
    assert "Started a local Ray instance" not in r.stderr + r.stdout
    assert time.time() - t0 < 60


def test_outage_mid_run_buffers_metrics_and_loses_none(tmp_path):
    import mlflow

    from bundlerec.tracking import RunLogger, start_run

    # no MLFLOW_HTTP_* settings here: RunLogger itself must not stall on MLflow's HTTP retries
    port = free_port()
    proc, uri = start_mlflow(tmp_path, port)
    try:
        run_id = start_run(uri, "outage", "outage-run", {"a": 1}, {})
        rl = RunLogger(uri, run_id, retries=8)
        assert rl.log({"loss": 1.0}, step=1)
        stop_mlflow(proc)  # outage: two epochs are logged while the server is away
        t0 = time.time()
        assert not rl.log({"loss": 0.9}, step=2)
        assert not rl.log({"loss": 0.8}, step=3)
        assert time.time() - t0 < 30, "logging must not stall training while the server is down"
        assert len(rl.pending) == 2 and rl.failures >= 2
        proc, uri = start_mlflow(tmp_path, port)  # back (same store)
        assert rl.log({"loss": 0.7}, step=4) and not rl.pending
        assert rl.flush()
        hist = mlflow.MlflowClient(uri).get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 0.9), (3, 0.8), (4, 0.7)]
        # and through the REST API, as the UI reads it
        got = mlflow_get(uri, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
        assert [m["step"] for m in sorted(got, key=lambda m: m["step"])] == [1, 2, 3, 4]
    finally:
        stop_mlflow(proc)


def test_metrics_that_cannot_be_written_fail_the_stage(tmp_path):
    """A stage never ends "successful" with its test metrics missing from MLflow."""
    from bundlerec.tracking import TrackingError, log_results

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match="could not be written"):
        log_results(dead, "0" * 32, {"bundlerec": {"ndcg@10": 0.5}}, None, retries=1)


def test_epochs_lost_by_an_outage_are_resent_after_training(tmp_path):
    """What rank 0's buffer lost (a worker restarted while the server was away) is re-sent by the
    driver from the checkpointed history, once per epoch: nothing missing, nothing doubled."""
    import mlflow

    from bundlerec.tracking import RunLogger, ensure_logged, start_run

    proc, uri = start_mlflow(tmp_path, free_port())
    try:
        run_id = start_run(uri, "resend", "resend-run", {}, {})
        RunLogger(uri, run_id).log({"val_ndcg_at_10": 0.1, "train_loss": 3.0}, step=1)  # epoch 2 was lost
        history = [{"epoch": 1, "val_ndcg_at_10": 0.1, "train_loss": 3.0},
                   {"epoch": 2, "val_ndcg_at_10": 0.2, "train_loss": 2.5}]
        assert ensure_logged(uri, run_id, history) == 2
        assert ensure_logged(uri, run_id, history) == 0  # idempotent
        client = mlflow.MlflowClient(uri)
        for key, want in (("val_ndcg_at_10", [(1, 0.1), (2, 0.2)]), ("train_loss", [(1, 3.0), (2, 2.5)])):
            assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) == want
    finally:
        stop_mlflow(proc)
    from bundlerec.tracking import TrackingError

    with pytest.raises(TrackingError):  # server gone for good: the driver says so instead of succeeding
        ensure_logged(uri, run_id, history + [{"epoch": 3, "val_ndcg_at_10": 0.3}], retries=1)


def test_champion_lookup_only_treats_absence_as_no_champion(tmp_path, monkeypatch):
    """Only "no such model / no such alias" lets a candidate become champion without comparison; any
    other registry error (here: the registry is unreachable) is raised."""
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in seconds, not after 7 backoffs
    from mlflow.exceptions import MlflowException

    from bundlerec.registry.promotion import current_champion

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/registry.db")  # a real MLflow store
    assert current_champion(client, "never-registered") is None
    client.create_registered_model("no-alias-yet")
    assert current_champion(client, "no-alias-yet") is None
    with pytest.raises(MlflowException):
        current_champion(mlflow.MlflowClient(f"http://127.0.0.1:{free_port()}"), "bundlerec")


def test_system_metrics_of_a_node_land_under_its_id_even_for_a_short_block(tmp_path):
    """tracking.system_metrics with a node id (what each training node's local rank 0 runs): the
    run gets system/<node>/* metrics, one closing sample even when the block is shorter than the interval."""
    import mlflow

    from bundlerec.tracking import system_metrics

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("sysm", artifact_location=str(tmp_path / "a")))
    with system_metrics(uri, run.info.run_id, 30.0, "train-node0"):
        time.sleep(0.2)
    got = client.get_run(run.info.run_id).data.metrics
    assert "system/train-node0/cpu_utilization_percentage" in got and not any(
        k.startswith("system/cpu") for k in got), sorted(got)
