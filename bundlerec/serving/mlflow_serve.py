"""The registered pyfunc under ``mlflow models serve``: the third leg of ``bundlerec loadtest
--side-by-side --with-mlflow`` (docs/benchmarks.md), beside Ray Serve and the bare FastAPI app.

The export is saved as the same pyfunc ``register`` logs (:func:`bundlerec.registry.pyfunc.model_kwargs`),
into a local folder. MLflow's scoring server (uvicorn, ``--env-manager local``: this environment,
nothing installed) serves it on a loopback port, and it answers ``POST /invocations`` with one
``user_id`` row per request and ``params={"k": k}``. It has no token check, impression ids, event
log or batching: that is what a user gets from the registry alone. This is for measurement only.
The endpoint stays Ray Serve, which reads the export after checking its digest and runs none of the
pyfunc's code (docs/reliability.md).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional


def save_pyfunc(export: str, dst: str) -> str:
    """The export as a local pyfunc model folder at ``dst`` (replaced)."""
    import mlflow

    from bundlerec.inference.recommender import Recommender
    from bundlerec.registry.pyfunc import model_kwargs

    shutil.rmtree(dst, ignore_errors=True)
    mlflow.pyfunc.save_model(path=dst, **model_kwargs(Recommender.from_export(export), export))
    return dst


def start_mlflow_serve(model_dir: str, workers: int, user_key_file: Optional[str] = None,
                       timeout_s: float = 600) -> tuple:
    """``mlflow models serve`` of ``model_dir`` on a free loopback port (``workers`` uvicorn
    processes, one torch thread each, as a replica has) in its own process group; returns (process,
    url) once it answers ``/ping``."""
    from bundlerec.serving.bare import launch

    bin_dir = os.path.dirname(sys.executable)  # MLflow runs `uvicorn` from PATH: this environment's
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1",
           **({"BUNDLEREC_USER_KEY_FILE": os.path.abspath(user_key_file)} if user_key_file else {})}
    mlflow_cli = os.path.join(bin_dir, "mlflow")

    def cmd(port: int) -> list:
        return [mlflow_cli, "models", "serve", "-m", model_dir, "-h", "127.0.0.1", "-p", str(port),
                "--env-manager", "local", "-w", str(workers)]

    return launch(cmd, "/ping", timeout_s, env)


def mlflow_levels(export: str, users: list[str], concurrency: list[int], n_requests: int, k: int, workers: int,
                  user_key_file: Optional[str], work_dir: str) -> list[dict]:
    """Recommendations from the pyfunc under ``mlflow models serve`` at each concurrency, with the
    CPU each process group spent per answered request (as the other legs)."""
    from bundlerec.serving.bare import stop_bare
    from bundlerec.serving.loadtest import route_levels

    model_dir = save_pyfunc(export, os.path.join(work_dir, "pyfunc"))
    proc, url = start_mlflow_serve(model_dir, workers, user_key_file)
    try:
        return route_levels(url, users, ["invocations"], concurrency, n_requests, k, None,
                             {"mlflow workers": [proc.pid]})["invocations"]
    finally:
        stop_bare(proc)


def add_mlflow_leg(res: dict, export: str, concurrency: list[int], n_requests: int, k: int, workers: int,
                   user_key_file: Optional[str]) -> dict:
    """``res`` (:func:`bundlerec.serving.loadtest.side_by_side`'s record) with the ``mlflow`` levels
    and ``mlflow_over_bare`` (p50, p99 and req/s of MLflow's server over the bare app's, recommendations)."""
    import tempfile

    from bundlerec.serving.loadtest import users_of

    with tempfile.TemporaryDirectory(prefix="bundlerec-mlflow-") as work:
        res["mlflow"] = mlflow_levels(export, users_of(export), concurrency, n_requests, k, workers, user_key_file, work)
    res["mlflow_over_bare"] = [{"concurrency": m["concurrency"], "p50": m["p50_ms"] / b["p50_ms"],
                                "p99": m["p99_ms"] / b["p99_ms"], "rps": m["throughput_rps"] / b["throughput_rps"]}
                               for m, b in zip(res["mlflow"], res["bare"]["recommendations"])]
    return res


def format_levels(levels: list[dict]) -> str:
    return "\n".join(f"| mlflow models serve | recommendations | {lv['concurrency']} | {lv['p50_ms']:.1f} | "
                     f"{lv['p99_ms']:.1f} | {lv['throughput_rps']:.0f} | {lv['errors']} |" for lv in levels)
