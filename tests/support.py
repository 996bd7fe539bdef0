"""What the tests share besides fixtures (those are in ``conftest.py``): free ports, the MLflow
server process, the tiny random-init encoders, small volumes, the datasets (``../shared`` or the
copies in ``datasets/``) and the tiny config. Tests import these from here, never from conftest."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


JOB_AGENT_PORT = 52365  # Ray's dashboard agent (the job API's agent) listens on this fixed port


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0




def require_job_agent() -> None:
    """Fail a job-submitting test with the reason when another Ray instance held the job agent's port."""
    if os.environ.get("BUNDLEREC_TEST_AGENT_PORT_TAKEN"):
        pytest.fail(f"another Ray instance on this machine listens on 127.0.0.1:{JOB_AGENT_PORT} (Ray's fixed "
                    f"dashboard-agent port), so the suite's cluster has no job agent: stop it (`make stop`, "
                    f"`ray stop` for one started by hand) and run the tests again")


def start_mlflow(d, port: int, backend: str | None = None, artifacts: str | None = None,
                 env: dict | None = None, app_name: str | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1:``port``: sqlite in ``d`` and local artifacts unless
    ``backend`` (e.g. postgresql://...) and ``artifacts`` (e.g. s3://bucket/mlflow) say otherwise;
    ``app_name="basic-auth"``: with MLflow's authentication app."""
    log = open(d / "server.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", *(["--app-name", app_name] if app_name else []), "--backend-store-uri", backend or f"sqlite:///{d}/mlflow.db",
         "--artifacts-destination", artifacts or str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **(env or {})})
    log.close()
    uri = f"http://127.0.0.1:{port}"
    try:
        # generous: a loaded 2-core box has needed more than 120 s (sqlite migrations + uvicorn start;
        # cluster/local.sh waits as long)
        wait_http(uri + "/health", 300)
    except BaseException:
        stop_mlflow(proc)
        raise
    return proc, uri


def stop_mlflow(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn/job-runner children
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)




def mlflow_post(uri: str, endpoint: str, body: dict) -> dict:
    import json

    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def mlflow_get(uri: str, endpoint: str, **params) -> dict:
    import json
    import urllib.parse

    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(params)}", timeout=30) as r:
        return json.loads(r.read())


TINY_ENCODER = Path(tempfile.gettempdir()) / "bundlerec-tiny-bert-v1"


def registered_checkpoints(storage: Path) -> int:
    """Checkpoints Ray Train has registered under ``storage`` (not merely started uploading)."""
    import glob
    import json

    n = 0
    for snap in glob.glob(f"{storage}/*/checkpoint_manager_snapshot.json"):
        try:
            n += len(json.load(open(snap))["checkpoint_results"])
        except (ValueError, KeyError, OSError):
            pass
    return n


def fit_in_thread(cfg, run_id: str | None = None):
    """``fit(cfg)`` started in a daemon thread (so that a test can break things while it trains);
    returns (thread, box): ``box["out"]`` is the result, ``box["err"]`` what it raised."""
    import threading

    from bundlerec.train.fit import fit

    box: dict = {}

    def run():
        try:
            box["out"] = fit(cfg, cfg.data.output_dir, run_id=run_id)
        except BaseException as e:  # the caller surfaces it
            box["err"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, box


def fit_through_a_tracking_outage(cfg, root: Path) -> dict:
    """``fit(cfg)`` logging to its own MLflow server, which is stopped once the 1st checkpoint is
    registered and restarted (same port, same store) after the 2nd: training must not wait for it.
    What happened goes to ``root/outage.json`` (the seconds epoch 2 took while the server was down,
    the train_loss history MLflow holds at the end, and the one training computed), which
    tests/test_train.py::test_mlflow_outage_during_training_loses_no_metric checks; the returned run
    is the suite's shared trained model (the outage changes nothing it trains)."""
    import dataclasses
    import json

    from bundlerec.tracking import start_run

    (root / "mlflow").mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc, uri = start_mlflow(root / "mlflow", port)
    storage = Path(cfg.train.storage_path)
    try:
        run_id = start_run(uri, "test-outage", "outage-in-training", {}, {})
        logged = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=uri))
        th, box = fit_in_thread(logged, run_id)
        deadline = time.time() + 400
        while registered_checkpoints(storage) < 1 and time.time() < deadline and th.is_alive():
            time.sleep(0.1)
        stop_mlflow(proc)  # the outage from here
        t_down = time.time()
        while registered_checkpoints(storage) < 2 and time.time() < deadline and th.is_alive():
            time.sleep(0.1)
        record = {"checkpoints_while_down": registered_checkpoints(storage),
                  "epoch2_seconds_while_down": round(time.time() - t_down, 1)}
        proc, uri = start_mlflow(root / "mlflow", port)  # back
        th.join(timeout=400)
        if "out" not in box:
            raise RuntimeError(f"training did not finish: {box.get('err')!r}")
        hist = mlflow_get(uri, "metrics/get-history", run_id=run_id, metric_key="train_loss")["metrics"]
        record["mlflow_train_loss"] = sorted((h["step"], round(h["value"], 6)) for h in hist)
        record["trained"] = [(h["epoch"], round(h["train_loss"], 6)) for h in box["out"]["history"]]
        (root / "outage.json").write_text(json.dumps(record, indent=2))
        return box["out"]
    finally:
        stop_mlflow(proc)


def tiny_encoder() -> str:
    """A tiny random-init BERT (2 layers, hidden 64: ~1.3 M parameters + embeddings) with MiniLM's
    tokenizer, saved as a normal HF model directory. For tests whose subject is the machinery
    (DeepSpeed, resume, Tune, registry, Serve), not what the pretrained weights know: MiniLM's 345 MB
    ZeRO-2 checkpoints and forwards are what made those tests slow. Deterministic (seed 0)."""
    if not (TINY_ENCODER / "model.safetensors").exists():
        import torch
        from transformers import AutoConfig, AutoModel

        from bundlerec.hub import load_tokenizer, resolve_model_path

        base = resolve_model_path("all-MiniLM-L6-v2")
        conf = AutoConfig.from_pretrained(base)
        conf.update({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128})
        torch.manual_seed(0)
        tmp = Path(tempfile.mkdtemp(prefix="tiny-bert-"))
        AutoModel.from_config(conf).save_pretrained(tmp)
        load_tokenizer("all-MiniLM-L6-v2").save_pretrained(tmp)
        try:
            tmp.rename(TINY_ENCODER)  # atomic: concurrent sessions never see half a model
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(TINY_ENCODER)


# Tiny random-init models of four families, built from configs (no hub): two encoders, two decoder LLMs.
FAMILIES = {
    "bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(model_type="roberta", hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=130, pad_token_id=1),
    "llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64),
    "qwen2": dict(model_type="qwen2", hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64),
}


def tiny_model_dir(family: str, root) -> str:
    """A tiny random-init model directory of ``family`` with MiniLM's tokenizer (vocabulary sized to it)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from bundlerec.hub import load_tokenizer

    out = root / family
    if not (out / "config.json").exists():
        kw = dict(FAMILIES[family])
        conf = AutoConfig.for_model(kw.pop("model_type"), vocab_size=1, **kw)
        conf.save_pretrained(out)
        load_tokenizer("all-MiniLM-L6-v2").save_pretrained(out)
        # the architecture's tokenizer class reads MiniLM's vocabulary (and may add its own end-of-text
        # token): the embedding table is sized to the tokenizer as this directory loads it
        conf.vocab_size = len(load_tokenizer(str(out)))
        torch.manual_seed(0)
        AutoModel.from_config(conf).save_pretrained(out)
    return str(out)


def mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``path``: None when mounted, else why not (needs root or
    CAP_SYS_ADMIN). Unmount with :func:`unmount`."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited with {r.returncode}")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def small_volume(path: Path, size: str):
    """A tmpfs of ``size`` (e.g. "256m") mounted at ``path`` for the block: a real disk that can fill
    up. Skipped where mounting is not allowed (needs root or CAP_SYS_ADMIN); under CI (``CI`` set, as
    `.ci/run` sets it) that fails the test instead, as a missing system package does."""
    why = mount_tmpfs(path, size)
    if why is not None:
        msg = f"cannot mount a small volume here: {why}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield path
    finally:
        unmount(path)


def fill_volume(path: Path) -> Path:
    """Fill the volume of ``path`` with one file (returned) until the disk refuses a byte more."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        chunk = 1 << 20
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError:
                chunk //= 2
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def moto_server(bucket: str = "bundlerec-it", port: int | None = None):
    """A real local S3 server (moto in server mode, as `BACKENDS=postgres-s3 cluster/local.sh start`
    runs it) with one bucket: yields (the client environment pyarrow's S3 filesystem reads, the
    server process)."""
    port = port or free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bundlerec-local",
           "AWS_SECRET_ACCESS_KEY": "bundlerec-local", "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", 60)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="bundlerec-local", aws_secret_access_key="bundlerec-local").create_bucket(Bucket=bucket)
        yield env, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def require_system_package(present: bool, package: str) -> None:
    """Skip a test whose Debian package (chromium, postgresql) is missing, naming the command that
    installs it; under CI (``CI`` set, as `.ci/run` sets it) a missing package fails the test instead."""
    if present:
        return
    msg = f"Debian's {package} is not installed: `make setup` installs it (or: sudo apt-get install {package})"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def dataset(name: str) -> Path:
    """A real dataset: the project's ``../shared/data/<name>`` when it is beside the checkout, else the
    copy shipped in ``datasets/<name>`` (datasets/README.md), so a bare clone runs the same tests."""
    shared = ROOT.parent / "shared" / "data" / name
    return shared if shared.is_dir() else ROOT / "datasets" / name


STEAM = dataset("steam_bundles")
INTENT = dataset("bundlerec_intent")


def tiny_overrides() -> list[str]:
    """Overrides that swap the tiny random-init encoder into jobs/configs/tiny.yaml (trained from
    scratch: no frozen layers, a from-scratch learning rate); served prices from the fitted model
    on the real Steam data."""
    return [f"model.name_or_path={tiny_encoder()}", "model.freeze_layers=0", "train.lr=1e-3",
            f"pricing.data_dir={STEAM}"]


def tiny_config(*overrides: str):
    """jobs/configs/tiny.yaml with the tiny encoder plus ``overrides``."""
    from bundlerec.config import load_config

    return load_config(str(ROOT / "jobs/configs/tiny.yaml"), [*tiny_overrides(), *overrides])


def pickled_files(root) -> list[str]:
    """Files under ``root`` that unpickling would read, by content, whatever their names: a pickle
    stream (protocol 2-5 header), a zip holding one (torch.save's format), or a NumPy array that
    does not load with ``allow_pickle=False`` (object arrays)."""
    import zipfile

    import numpy as np

    found = []
    for p in sorted(Path(root).rglob("*")):
        if not p.is_file():
            continue
        with open(p, "rb") as f:
            head = f.read(2)
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            found.append(str(p))
        elif zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                if any(n.endswith((".pkl", ".pickle")) or n.endswith("/data.pkl") for n in z.namelist()):
                    found.append(str(p))
        elif p.suffix == ".npy":
            try:
                np.load(p, allow_pickle=False)
            except ValueError:
                found.append(str(p))
    return found
