"""MLflow tracking: one run per pipeline run, params from the resolved config, per-epoch metrics
from rank 0, test metrics of the model and every baseline, the exported model as an artifact.

MLflow metric names cannot hold ``@``: ``ndcg@10`` is logged as ``ndcg_at_10``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Iterator, Optional

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be reached."""


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail before any compute is spent when an HTTP tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            healthy = r.status == 200
    except Exception as e:
        raise TrackingError(f"MLflow tracking server {uri} is not reachable ({e}). Start it with "
                            f"`make services` (cluster/local.sh start) or set mlflow.tracking_uri.") from None
    if not healthy:
        raise TrackingError(f"MLflow tracking server {uri} answered /health with an error")
    check_credentials(uri, timeout_s)


def check_credentials(uri: str, timeout_s: float = 10.0) -> None:
    """A server with authentication (``mlflow server --app-name basic-auth``) answers 401 without
    credentials and 403 to wrong ones: say which, before any compute."""
    import base64

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    req = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/registered-models/search?max_results=1")
    if user and password:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise TrackingError(
                f"MLflow tracking server {uri} refused {'user ' + repr(user) if user else 'a request without credentials'} "
                f"(HTTP {e.code}): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (with cluster/local.sh "
                "MLFLOW_AUTH=basic: source .cluster/mlflow-trainer.env)") from None
    except Exception:  # other trouble shows up at the first real call, with MLflow's own message
        return


def write_env_file(path: str, values: dict) -> None:
    """KEY=VALUE lines, created with mode 0600 (secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in values.items()))


def read_env_file(path: str) -> dict:
    with open(path) as f:
        return dict(line.strip().split("=", 1) for line in f if "=" in line and not line.startswith("#"))


CREDENTIALS_ENV = "BUNDLEREC_MLFLOW_CREDENTIALS_FILE"
"""A job's MLflow identity as a file path (``bundlerec submit`` on this machine): the job's environment,
which Ray keeps in its job table and shows in the dashboard, never holds the password itself."""


def load_credentials() -> None:
    """MLFLOW_TRACKING_USERNAME/PASSWORD from the file ``$BUNDLEREC_MLFLOW_CREDENTIALS_FILE`` names,
    unless this process has both already; called by every process of a job that talks to MLflow
    (the job's driver, Train workers, Tune trials)."""
    path = os.environ.get(CREDENTIALS_ENV)
    if path and not (os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD")):
        os.environ.update({k: v for k, v in read_env_file(path).items()
                           if k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")})


def setup_basic_auth(uri: str, admin_password: str, out_dir: str) -> dict:
    """Identities of an MLflow server run with ``--app-name basic-auth`` (default permission READ):

    * ``trainer``: the jobs (prep, train, tune, register, experiments): creates the registered model,
      so it manages it; the only identity that may write it (versions, aliases, tags);
    * ``serving``: Serve replicas and readers: READ everywhere, every write to the model refused (403).

    Writes ``mlflow-<identity>.env`` (MLFLOW_TRACKING_USERNAME/PASSWORD, mode 0600) under ``out_dir``
    for each; existing files are kept (so re-running is harmless). Returns {identity: env file}."""
    import secrets

    from mlflow.server.auth.client import AuthServiceClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=admin_password)
    out = {}
    try:
        admin = AuthServiceClient(uri)
        for name in ("trainer", "serving"):
            path = os.path.join(out_dir, f"mlflow-{name}.env")
            if not os.path.exists(path):
                password = secrets.token_urlsafe(24)
                try:
                    admin.create_user(name, password)
                except Exception:  # the user exists (env file lost): give it a new password
                    admin.update_user_password(name, password)
                write_env_file(path, {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": password})
            out[name] = path
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return out


def start_run(tracking_uri: str, experiment: str, run_name: Optional[str], params: dict, tags: dict) -> str:
    import mlflow

    from bundlerec.runtime import git_commit

    check_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.set_experiment(experiment)
    client = mlflow.MlflowClient(tracking_uri)
    commit = git_commit()
    if commit:  # the code that ran (MLflow's UI shows this tag on the run page)
        tags = {"mlflow.source.git.commit": commit.removesuffix("-dirty"),
                "bundlerec.git_dirty": str(commit.endswith("-dirty")).lower(), **tags}
    run = client.create_run(exp.experiment_id, run_name=run_name, tags=tags)
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # log_batch accepts at most 100 params per call
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


@contextlib.contextmanager
def one_try(timeout_s: float = 10) -> Iterator[None]:
    """MLflow client calls inside this block try once, for at most ``timeout_s`` (MLflow's default:
    7 retries with exponential backoff, minutes against a server that is down)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RunLogger:
    """Metric logging that survives a tracking-server outage: a failed write keeps the metrics in a
    buffer (with their original step and timestamp) and training goes on; every later ``log`` sends
    the backlog first, and ``flush`` at the end retries with backoff until the buffer is empty."""

    def __init__(self, tracking_uri: str, run_id: str, retries: int = 6, timeout_s: int = 10):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id
        self.retries = retries
        self.timeout_s = timeout_s
        self.pending: list = []
        self.failures = 0

    def log(self, metrics: dict, step: int) -> bool:
        """Buffer and try one send (no waiting); True when nothing is left pending."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items() if v == v]
        return self._send()

    def _one_try(self):
        """MLflow's own HTTP retries (7, exponential backoff: minutes) would stall rank 0 and with it
        every rank at the next collective; here a send tries once and the buffer is the retry."""
        return one_try(self.timeout_s)

    def _send(self) -> bool:
        try:
            with self._one_try():
                while self.pending:
                    self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                    self.pending = self.pending[1000:]
            return True
        except Exception as e:  # server away: keep the buffer
            self.failures += 1
            log.warning("mlflow logging failed (%s); %d metric values buffered", type(e).__name__, len(self.pending))
            return False

    def flush(self, retries: Optional[int] = None) -> bool:
        """Send the backlog, retrying with backoff (1, 2, 4, ... s); True when the buffer is empty."""
        for attempt in range(self.retries if retries is None else retries):
            if self._send():
                return True
            time.sleep(min(30, 2 ** attempt))
        if self.pending:
            log.error("mlflow: %d metric values could not be sent to run %s", len(self.pending), self.run_id)
        return not self.pending


def log_results(tracking_uri: str, run_id: str, metrics: dict, export_dir: Optional[str],
                files: Optional[dict] = None, retries: int = 6) -> None:
    """Test metrics as ``test/<method>/<metric>`` (+ model metrics unprefixed), model artifacts."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    flat = {}
    for method, m in metrics.items():
        for k, v in m.items():
            if isinstance(v, dict):  # ci95: {metric: [lo, hi]} -> test/<method>/<metric>_ci95_lo|hi
                for name, (lo, hi) in v.items():
                    flat[f"test/{method}/{mlflow_name(name)}_{k}_lo"] = lo
                    flat[f"test/{method}/{mlflow_name(name)}_{k}_hi"] = hi
                continue
            flat[f"test/{method}/{mlflow_name(k)}"] = v
            if method == "bundlerec":
                flat[f"test_{mlflow_name(k)}"] = v
    rl = RunLogger(tracking_uri, run_id, retries=retries)
    if not (rl.log(flat, step=0) or rl.flush()):
        raise TrackingError(f"the test metrics of run {run_id} could not be written to {tracking_uri}; "
                            f"results.json holds them: re-run the stage once the server is back")
    if export_dir:
        client.log_artifacts(run_id, export_dir, artifact_path="model")
    for name, path in (files or {}).items():
        if "://" in path:  # on object storage (s3://...): its text, under its file name
            from bundlerec.storage import read_text

            client.log_text(run_id, read_text(path), f"{name}/{path.rstrip('/').rsplit('/', 1)[-1]}")
        else:
            client.log_artifact(run_id, path, artifact_path=name)


def mlflow_name(metric: str) -> str:
    """MLflow metric names cannot hold '@': ndcg@10 -> ndcg_at_10."""
    return metric.replace("@", "_at_")


def ensure_logged(tracking_uri: str, run_id: str, history: list[dict], retries: int = 6) -> int:
    """Make MLflow hold every per-epoch metric of ``history`` (``epoch`` is the step): whatever a
    tracking outage lost from rank 0's buffer is sent again. Returns how many values were re-sent;
    raises TrackingError when they still cannot be written, so a run never ends "successful" with
    metrics missing."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    rl = RunLogger(tracking_uri, run_id, retries=retries)
    resent = 0
    try:
        keys = sorted({k for h in history for k in h if k != "epoch"})
        with rl._one_try():
            have = {k: {m.step for m in client.get_metric_history(run_id, k)} for k in keys}
        for h in history:
            missing = {k: v for k, v in h.items() if k != "epoch" and h["epoch"] not in have.get(k, set())}
            if missing:
                rl.pending += [_metric(k, v, h["epoch"]) for k, v in missing.items() if v == v]
                resent += len(missing)
    except Exception as e:  # the server is down now: retry below
        log.warning("mlflow: could not read run %s back (%s); re-sending every epoch", run_id, type(e).__name__)
        rl.pending = [_metric(k, v, h["epoch"]) for h in history for k, v in h.items() if k != "epoch" and v == v]
        resent = len(rl.pending)
    if rl.pending and not rl.flush():
        raise TrackingError(f"{len(rl.pending)} per-epoch metric values of run {run_id} could not be written to "
                            f"{tracking_uri} after {retries} tries")
    if resent:
        log.info("mlflow: re-sent %d per-epoch metric values of run %s that an outage had lost", resent, run_id)
    return resent


def _metric(key: str, value: float, step: int):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), int(step))


def log_prep_dataset(tracking_uri: str, run_id: str, prep_dir: str, manifest: dict, context: str = "training") -> str:
    """The prepared data as the run's MLflow dataset input (Datasets column of the UI): its location
    and a digest of prep's manifest (row counts, schema hash, config), so two runs on the same data
    show the same digest. Returns the digest."""
    import hashlib
    import json
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path is a local path
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(prep_dir)
    ds = MetaDataset(source=source, name=f"bundlerec-prep-{manifest.get('schema_hash', '')}", digest=digest)
    mlflow.MlflowClient(tracking_uri).log_inputs(
        run_id, [DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])
    return digest


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str, interval_s: float = 10.0, node_id: Optional[str] = None) -> Iterator[None]:
    """CPU, memory, disk, network (and GPU where there is one and ``nvidia-ml-py`` is installed) of this
    machine, sampled into the run's ``system/*`` metrics while the block runs (MLflow's
    SystemMetricsMonitor), and once more when it ends (so a block shorter than ``interval_s`` has a
    sample too; CPU utilization is the average since the previous sample); with ``node_id`` under
    ``system/<node_id>/*``: the training workers' nodes (one monitor per node, local rank 0) beside the
    driver's."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    mon = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri, node_id=node_id)
    mon.start()
    try:
        yield
    finally:
        mon.finish()
        try:  # the closing sample (best effort: metrics never fail the block)
            mon.collect_metrics()
            mon.publish_metrics(mon.aggregate_metrics())
            mon.mlflow_logger.flush()
        except Exception as e:
            log.warning("bundlerec: the closing system-metrics sample was not logged: %s", e)


def log_evaluation(tracking_uri: str, experiment: str, run_name: str, params: dict, metrics: dict,
                   files: list) -> str:
    """An evaluation as its own MLflow run: its parameters, flat metrics and result files; returns the run id."""
    import mlflow

    run_id = start_run(tracking_uri, experiment, run_name, {k: v for k, v in params.items() if v is not None},
                       {"bundlerec.stage": run_name})
    client = mlflow.MlflowClient(tracking_uri)
    rl = RunLogger(tracking_uri, run_id)
    if not (rl.log(metrics, step=0) or rl.flush()):
        raise TrackingError(f"the metrics of run {run_id} could not be written to {tracking_uri}; the result files hold them")
    for path in files:
        client.log_artifact(run_id, path, artifact_path="results")
    client.set_terminated(run_id, "FINISHED")
    return run_id
