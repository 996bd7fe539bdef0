"""A 2-trial Ray Tune sweep with ASHA on the tiny data, its driver killed after the first trial and
resumed: every trial is a 2-worker DeepSpeed run, each with its own MLflow child run nested under the
sweep's parent run (asserted over the REST API), and the MLflow UI, opened in headless Chromium, shows
the sweep (a screenshot is kept as an artefact)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT, mlflow_get, mlflow_post, require_system_package, tiny_config, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
ARTIFACTS = ROOT / "runs" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def sweep(tiny_prep, mlflow_server, ray_cluster, tmp_path_factory):
    """A 2-trial sweep as a user runs it (`python -m jobs.tune`), its driver SIGKILLed once the first
    trial's export is committed, then the same command with tune.resume=true: the sweep the other
    tests read is the resumed one (one sweep serves the fault and the bookkeeping checks)."""
    import json
    import os
    import signal
    import sys
    import time

    import ray

    prep_cfg, _ = tiny_prep
    root = tmp_path_factory.mktemp("sweep")
    over = [f"data.output_dir={prep_cfg.data.output_dir}", f"tune.storage_path={root}/tune",
            f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=sweep-test", "tune.num_samples=2",
            f"results_path={root}/results.json"]
    args = [sys.executable, "-m", "jobs.tune", "--config", "jobs/configs/tiny.yaml", *over, *tiny_overrides()]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    sweep_dir = root / "tune" / "tiny-sweep"
    with open(root / "first.log", "w") as log:
        p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 500
        while time.time() < deadline and p.poll() is None and not list(sweep_dir.glob("exports/*/bundlerec.json")):
            time.sleep(0.5)
        assert p.poll() is None, (root / "first.log").read_text()[-3000:]
        assert list(sweep_dir.glob("exports/*/bundlerec.json")), "no trial finished before the deadline"
        os.killpg(p.pid, signal.SIGKILL)  # the driver dies mid-sweep
        p.wait(timeout=30)
    state = json.loads((sweep_dir / "bundlerec_sweep_state.json").read_text())
    time.sleep(5)  # the dead driver's trial actors are reclaimed by Ray
    r = subprocess.run(args + ["tune.resume=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=700)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    s = json.loads((sweep_dir / "sweep.json").read_text())
    return tiny_config(*over), s, state, json.loads((root / "results.json").read_text())


def test_sweep_trials_are_nested_mlflow_runs(sweep, mlflow_server):
    cfg, s, _, _ = sweep
    assert len(s["trials"]) == 2 and s["best"]["export_dir"]
    assert Path(s["best"]["export_dir"], "item_index.npy").exists()
    found = mlflow_post(mlflow_server, "runs/search", {
        "experiment_ids": [s["experiment_id"]],
        "filter": f"tags.`mlflow.parentRunId` = '{s['parent_run_id']}'"})["runs"]
    assert len(found) == 2
    assert len({r["info"]["run_id"] for r in found}) == 2  # no two trials share a run
    trial_ids = {t["trial_id"] for t in s["trials"]}
    for r in found:
        tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
        params = {p["key"]: p["value"] for p in r["data"]["params"]}
        assert tags["bundlerec.trial_id"] in trial_ids
        assert "train.lr" in params and "model.temperature" in params
        hist = mlflow_get(mlflow_server, "metrics/get-history", run_id=r["info"]["run_id"], metric_key="val_ndcg_at_10")
        steps = [m["step"] for m in hist["metrics"]]
        assert steps and steps == sorted(set(steps))  # per-epoch, no duplicates
    lrs = {float({p["key"]: p["value"] for p in r["data"]["params"]}["train.lr"]) for r in found}
    assert len(lrs) == 2  # the search proposed distinct configurations
    parent = mlflow_get(mlflow_server, "runs/get", run_id=s["parent_run_id"])["run"]
    assert "best_val_ndcg_at_10" in {m["key"] for m in parent["data"]["metrics"]}
    # a trial's data.history_len is what it trained, exported and is evaluated with (prep kept enough)
    import json

    for t in s["trials"]:
        if t["export_dir"]:
            meta = json.loads(Path(t["export_dir"], "bundlerec.json").read_text())
            assert meta["history_len"] == t["config"]["data.history_len"], (meta, t["config"])


def test_mlflow_ui_shows_the_sweep(sweep, mlflow_server, tmp_path):
    require_system_package(CHROMIUM is not None, "chromium")
    cfg, s, _, _ = sweep
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = f"{mlflow_server}/#/experiments/{s['experiment_id']}/runs"
    common = [CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path}/chrome", "--virtual-time-budget=20000",
              "--window-size=1600,1000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert s["sweep_name"] in dom, "the sweep's parent run is not listed in the MLflow UI"
    shot = ARTIFACTS / "mlflow_ui_sweep.png"
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    # the parent run's page lists every trial as a child run
    run_url = f"{mlflow_server}/#/experiments/{s['experiment_id']}/runs/{s['parent_run_id']}"
    dom = subprocess.run([*common, "--dump-dom", run_url], capture_output=True, text=True, timeout=120).stdout
    assert "Child runs" in dom
    for t in s["trials"]:
        assert f"trial-{t['trial_id']}" in dom


@pytest.mark.e2e
def test_sweep_survives_a_killed_driver_and_resumes(sweep, mlflow_server):
    """The sweep driver was SIGKILLed after its first trial finished (the `sweep` fixture); the same
    command with tune.resume=true finished the remaining trials in the same MLflow parent run and
    evaluated the best one."""
    _, s, state, results = sweep
    assert s["resumed"] is True and s["parent_run_id"] == state["parent_run_id"]
    assert len(s["trials"]) == 2 and all(t["error"] is None for t in s["trials"])
    assert sum(1 for t in s["trials"] if t["export_dir"]) >= 1
    # one child run per trial under the same parent: nothing duplicated by the restart
    runs = mlflow_post(mlflow_server, "runs/search", {
        "experiment_ids": [state["experiment_id"]], "max_results": 100,
        "filter": f"tags.mlflow.parentRunId = '{state['parent_run_id']}'"})["runs"]
    tids = [t["value"] for run in runs for t in run["data"]["tags"] if t["key"] == "bundlerec.trial_id"]
    assert sorted(tids) == sorted(t["trial_id"] for t in s["trials"]) and len(set(tids)) == 2
    # the stage went on to evaluate the best trial on the test split, in that trial's run
    assert results["run_id"] == s["best"]["run_id"] and results["export_dir"] == s["best"]["export_dir"]
    assert 0 <= results["metrics"]["bundlerec"]["ndcg@10"] <= 1
