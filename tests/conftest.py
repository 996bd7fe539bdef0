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
import time
from pathlib import Path

import pytest

from bundlerec.runtime import LOCAL_NUM_CPUS, WORKER_ENV, setup_env
from tests.support import JOB_AGENT_PORT, _listening, free_port, start_mlflow, stop_mlflow, tiny_config, wait_http

setup_env()
# Job drivers and workers started by the suite's Ray cluster resolve `python` on PATH: make it this
# interpreter's environment (as `make test` and cluster/local.sh do), whoever started pytest.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


TRAINING_FILES = {"test_train.py", "test_tune.py"}
"""Ray Train and Tune tests: `make test` runs them on a second Ray cluster of their own (:func:`ray_cluster`)."""
JOB_FILES = ("test_backends.py", "test_cli.py", "test_make_demo.py")
"""Tests that submit Ray jobs. `make test` runs them first, and starts the second cluster only once they
are done (``BUNDLEREC_TEST_JOBS_DONE``, a flag file): twice a job submitted while the second cluster
ran could not fetch its working_dir package from the first cluster's GCS (docs/CHANGELOG.md, sessions 23-24)."""


@pytest.hookimpl(tryfirst=True)  # before the `-m` selection reads the marks
def pytest_collection_modifyitems(config, items):
    """Every test that uses the suite's Ray cluster is marked ``ray``, those of TRAINING_FILES also
    ``training``. `make test` runs two pytest processes side by side, each with its own Ray cluster
    when it needs one: ``-m "ray and not training"`` (the job API, Serve, the pipeline), and
    ``-m "not ray or training"`` (the unit tier, the MLflow-only integration tests, then training and
    tuning), because the Ray tests mostly wait on processes and leave the 2 cores half idle."""
    for item in items:
        if "ray_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.ray)
            if item.path.name in TRAINING_FILES:
                item.add_marker(pytest.mark.training)
    if os.environ.get("BUNDLEREC_TEST_STREAM") == "a":
        items.sort(key=lambda it: it.path.name not in JOB_FILES)  # stable: the job-submitting files first
    elif os.environ.get("BUNDLEREC_TEST_STREAM") == "b" and os.environ.get("BUNDLEREC_TEST_JOBS_DONE"):
        first = next((it for it in items if "ray_cluster" in it.fixturenames), None)
        if first is not None:  # its set-up may wait up to JOBS_WAIT_S for the other process (ray_cluster)
            first.add_marker(pytest.mark.timeout(JOBS_WAIT_S + 900))


JOBS_WAIT_S = 1800
"""How long stream b's cluster waits for stream a's job submissions to finish."""


def _jobs_done() -> None:
    """Stream a's signal to stream b: no more job submissions (the flag file of `make test`)."""
    flag = os.environ.get("BUNDLEREC_TEST_JOBS_DONE")
    if flag and os.environ.get("BUNDLEREC_TEST_STREAM") == "a" and not os.path.exists(flag):
        Path(flag).touch()


def pytest_runtest_setup(item):
    if item.path.name not in JOB_FILES:
        _jobs_done()


def pytest_sessionfinish(session, exitstatus):
    _jobs_done()  # also when stream a stops early: stream b must not wait for it


def _cpu_log() -> Path:
    """This pytest process's free-CPU log (``BUNDLEREC_TEST_STREAM`` names the process in `make test`)."""
    tag = os.environ.get("BUNDLEREC_TEST_STREAM", "")
    return Path(__file__).resolve().parents[1] / "runs" / "test-artifacts" / f"ray_cpus{'-' + tag if tag else ''}.log"


@pytest.fixture(scope="session")
def ray_cluster():
    """A fresh local Ray instance (LOCAL_NUM_CPUS logical CPUs, 1 GiB object store, dashboard + job API).
    Another Ray instance on this machine (``make services``, a job started by hand) holds the job
    agent's fixed port, and this one's job API would never take a job: the tests that submit jobs
    fail at once saying so (:func:`require_job_agent`). In `make test`'s second pytest process
    (``BUNDLEREC_TEST_STREAM=b``: the Train and Tune tests, which submit no job) the instance is a
    ``ray start --head --block`` with every port its own, the dashboard agent's included: two agents on
    Ray's fixed port would share its connections, and a job submitted to the first cluster could be
    handed to the second's agent, which cannot find its working_dir package."""
    import ray

    # (an environment variable: pytest's conftest module and `from tests.support import` may be two modules)
    os.environ["BUNDLEREC_TEST_AGENT_PORT_TAKEN"] = "1" if _listening(JOB_AGENT_PORT) else ""

    _cpu_log().unlink(missing_ok=True)  # this run's only
    tmp = tempfile.mkdtemp(prefix="brt-", dir="/tmp")  # short: unix socket path limit
    head = None
    if os.environ.get("BUNDLEREC_TEST_STREAM") == "b":
        head, gcs, url = _own_ports_head(tmp)
        ray.init(address=gcs, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
    else:
        ctx = ray.init(address="local", num_cpus=LOCAL_NUM_CPUS, object_store_memory=1 << 30, include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=free_port(), _temp_dir=tmp,
                       runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
        url = "http://" + ctx.dashboard_url
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        wait_http(url + "/api/gcs_healthz", 60)  # open route; everything else needs the Ray auth token
        yield url
    finally:
        ray.shutdown()
        if head is not None:
            _stop_head(head)
        shutil.rmtree(tmp, ignore_errors=True)


def _own_ports_head(tmp: str):
    """``ray start --head --block`` on ports of its own (free ones; Ray's defaults left to the other
    cluster), its processes in one process group; returns (process, GCS address, dashboard URL)."""
    import subprocess

    flag, deadline = os.environ.get("BUNDLEREC_TEST_JOBS_DONE"), time.time() + JOBS_WAIT_S
    if flag and not os.path.exists(flag):
        print(f"\n[tests] waiting for the other pytest process's job submissions to finish ({flag})", flush=True)
    while flag and not os.path.exists(flag) and time.time() < deadline:
        time.sleep(2)
    ports = {k: free_port() for k in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                      "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                                      "node-manager-port", "object-manager-port")}
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--temp-dir={tmp}",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--num-cpus={LOCAL_NUM_CPUS}", f"--object-store-memory={1 << 30}", "--disable-usage-stats",
           *(f"--{k}={v}" for k, v in ports.items())]
    log = open(os.path.join(tmp, "ray-start.log"), "w")
    # its processes (Train's placement-group cleaner among them) find it by RAY_ADDRESS, not by looking
    # for a single Ray instance on the machine: there are two
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{ports['port']}"}
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_http(url + "/api/gcs_healthz", 120)
    except BaseException:
        _stop_head(head)
        raise RuntimeError(f"ray start did not come up: {open(os.path.join(tmp, 'ray-start.log')).read()[-3000:]}")
    return head, f"127.0.0.1:{ports['port']}", url


def _stop_head(head) -> None:
    """SIGTERM to the head's process group (``--block`` then stops what it started), SIGKILL after 60 s."""
    import signal
    import subprocess

    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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
