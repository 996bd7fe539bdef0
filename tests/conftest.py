"""Shared fixtures: a real local Ray cluster and a real MLflow server, both on 127.0.0.1.

Integration tests are marked ``integration``; every one has a hard timeout (pytest-timeout) because
Ray resource mistakes hang rather than fail.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from bundlerec.runtime import LOCAL_NUM_CPUS, WORKER_ENV, setup_env
from tests.support import JOB_AGENT_PORT, _listening, free_port, start_mlflow, stop_mlflow, tiny_config, wait_http

setup_env()
# Job drivers and workers started by the suite's Ray cluster resolve `python` on PATH: make it this
# interpreter's environment (as `make test` and cluster/local.sh do), whoever started pytest.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.hookimpl(tryfirst=True)  # before the `-m` selection reads the marks
def pytest_collection_modifyitems(config, items):
    """Every test that uses the suite's Ray cluster is marked ``ray``. `make test` runs ``-m ray`` (one
    Ray instance on the machine, in file order) and, in a second pytest process beside it,
    ``-m "not ray"`` (the unit tier and the MLflow-only integration tests), because the Ray tests
    mostly wait on processes and leave the 2 cores half idle. (A second Ray cluster for the Train
    and Tune tests was tried: while it started, a job on the first cluster could not fetch its
    working_dir package from that cluster's GCS.)"""
    for item in items:
        if "ray_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.ray)


def _cpu_log() -> Path:
    """This pytest process's free-CPU log (``BUNDLEREC_TEST_STREAM`` names the process in `make test`)."""
    tag = os.environ.get("BUNDLEREC_TEST_STREAM", "")
    return Path(__file__).resolve().parents[1] / "runs" / "test-artifacts" / f"ray_cpus{'-' + tag if tag else ''}.log"


@pytest.fixture(scope="session")
def ray_cluster():
    """A fresh local Ray instance (LOCAL_NUM_CPUS logical CPUs, 1 GiB object store, dashboard + job API).
    Another Ray instance on this machine (``make services``, a job started by hand) holds the job
    agent's fixed port, and this one's job API would never take a job: the tests that submit jobs
    fail at once saying so (:func:`require_job_agent`)."""
    import ray

    # (an environment variable: pytest's conftest module and `from tests.support import` may be two modules)
    os.environ["BUNDLEREC_TEST_AGENT_PORT_TAKEN"] = "1" if _listening(JOB_AGENT_PORT) else ""

    _cpu_log().unlink(missing_ok=True)  # this run's only
    tmp = tempfile.mkdtemp(prefix="brt-", dir="/tmp")  # short: unix socket path limit
    ctx = ray.init(address="local", num_cpus=LOCAL_NUM_CPUS, object_store_memory=1 << 30, include_dashboard=True,
                   dashboard_host="127.0.0.1", dashboard_port=free_port(), _temp_dir=tmp,
                   runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    url = "http://" + ctx.dashboard_url
    wait_http(url + "/api/gcs_healthz", 60)  # open route; everything else needs the Ray auth token
    yield url
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _ray_cpus_after_each_test(request):
    """After each test, the suite cluster's free logical CPUs, one line per test in
    runs/test-artifacts/ray_cpus-a.log (`make test`; ray_cpus.log otherwise): a test that leaves CPUs held (a replica, an actor pool, a
    running job) shows as the line where the count drops and stays down. Each line also has the
    test's wall time (its call and function-scoped set-up) and the clock, so a running suite's slow
    parts can be read while it runs."""
    import time

    t0 = time.time()
    yield
    took = time.time() - t0
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    box: dict = {}

    def ask() -> None:
        try:
            box["free"] = ray.available_resources().get("CPU", 0.0)
        except Exception as e:  # the record must never fail a test
            box["free"] = f"? ({type(e).__name__})"

    th = threading.Thread(target=ask, daemon=True)  # a driver that lost the GCS hangs here: never the suite
    th.start()
    th.join(20)
    free = box.get("free", "unanswered in 20 s (the driver's GCS connection is stuck)")
    log = _cpu_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"{request.node.nodeid} free_cpus={free} took_s={took:.1f} at={time.strftime('%H:%M:%S')}\n")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, local artifacts) on a free loopback port."""
    proc, uri = start_mlflow(tmp_path_factory.mktemp("mlflow"), free_port())
    try:
        yield uri
    finally:
        stop_mlflow(proc)


@pytest.fixture(scope="session")
def tiny_prep(ray_cluster, tmp_path_factory):
    """The tiny synthetic dataset, prepared once (tokenized for the tiny encoder) for the training tests."""
    from bundlerec.data.prep import run_prep

    root = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config(f"output_root={root}")
    manifest = run_prep(cfg)
    return cfg, manifest


@pytest.fixture(scope="session")
def tiny_trained(tiny_prep, tmp_path_factory):
    """A 2-worker ZeRO-2 training of the tiny encoder on the tiny data (3 epochs x 12 steps), exported.
    Its MLflow server is down from the 1st checkpoint to the 2nd (tests.support.fit_through_a_tracking_outage:
    one shared run serves the tracking-fault check and the uninterrupted reference)."""
    from tests.support import fit_through_a_tracking_outage

    prep_cfg, _ = tiny_prep
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(f"data.output_dir={prep_cfg.data.output_dir}", f"train.storage_path={root}/ray",
                      f"results_path={root}/results.json", "train.zero_stage=2", "train.epochs=3",
                      "train.max_steps_per_epoch=12")
    return cfg, fit_through_a_tracking_outage(cfg, root), root
