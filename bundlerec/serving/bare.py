"""The same model behind a bare FastAPI app under uvicorn, with no Ray Serve: the alternative a user
would assemble themselves, kept only to measure what Serve costs side by side
(``bundlerec loadtest --side-by-side``; docs/benchmarks.md).

It does the per-request work the Serve replica does for the two measured routes, with the same code:
the export loaded and checked by :func:`bundlerec.serving.loading.load` (manifest, canned request,
the ANN index for large catalogs), the same request and response schemas, the same bearer-token and
body-limit guards, and a signed impression id in every answer. What it leaves out is what Serve and
the online loop add: the HTTP proxy and router hop, ``@serve.batch`` micro-batching, registry
following, Serve's request metrics and the event log. Handlers are plain ``def`` routes, so FastAPI
runs them in its thread pool, as a hand-written app would.

    python -m bundlerec.serving.bare runs/demo/export 8100 --workers 2 --token-file runs/demo/api_token \
        --user-key-file runs/demo/user_key
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from typing import Optional

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError

from bundlerec.config import ServeConfig
from bundlerec.serving import guards
from bundlerec.serving.schemas import BundleRequest, BundleResponse, RecommendationRequest, RecommendationResponse

ENV = "BUNDLEREC_BARE_ARGS"  # the settings, as JSON, for each uvicorn worker process (the app factory reads them)


def build_bare_app(export: str, token_file: Optional[str] = None, user_key_file: Optional[str] = None,
                   torch_threads: int = 1, serve: Optional[ServeConfig] = None) -> FastAPI:
    """A FastAPI app answering ``/v1/recommendations`` and ``/v1/bundles`` from ``export``
    (``user_key_file``: the key of a pseudonymized export, as the Serve app takes it)."""
    import torch

    from bundlerec.experiments.assignment import ImpressionSigner, new_session_id
    from bundlerec.serving.auth import TokenAuth
    from bundlerec.serving.loading import load

    serve = serve or ServeConfig()
    torch.set_num_threads(torch_threads)
    guards.GUARDS.auth = TokenAuth(token_file) if token_file else None
    guards.GUARDS.max_body_bytes = serve.max_body_bytes
    from bundlerec.privacy import read_user_key

    user_key = read_user_key(user_key_file) if user_key_file else None
    m = load(export, None, {"min_items": serve.ann_min_items, "nprobe": serve.ann_nprobe, "threads": torch_threads},
             user_key)
    signer = ImpressionSigner(hashlib.sha256(f"bundlerec:{export}".encode()).digest())
    app = FastAPI(title="bundlerec (bare FastAPI, no Ray Serve)")
    app.middleware("http")(guards.limit_body)
    app.exception_handler(RequestValidationError)(guards.validation_error)

    def history(req):
        if req.events is not None:
            return m.rec.history_from_events([e.model_dump() for e in req.events], now=req.as_of)
        return m.rec.history_for_user(req.user_id)

    def impression(unit: Optional[str], endpoint: str, shown: list) -> dict:
        new = None if unit else new_session_id()  # as the replica does for an anonymous request
        iid, _ = signer.issue(unit or new, None, None, m.info.version, endpoint, shown)
        return {"impression_id": iid, "experiment": None, "session_id": new}

    @app.post("/v1/recommendations", response_model=RecommendationResponse, dependencies=[Depends(guards.require_token)])
    def recommend(req: RecommendationRequest) -> RecommendationResponse:
        h = history(req)
        items = m.rec.describe(m.rec.recommend_histories([h], req.k)[0][:req.k])
        return RecommendationResponse(items=items, cold_start=not h.items, unknown_items=h.unknown_items,
                                      history_source=h.source, model=m.info,
                                      **impression(req.user_id or req.session_id, "recommendations",
                                                   [[i["item_id"] for i in items]]))

    @app.post("/v1/bundles", response_model=BundleResponse, dependencies=[Depends(guards.require_token)])
    def bundles(req: BundleRequest) -> BundleResponse:
        kw = dict(n=req.n, max_size=req.max_size, budget=req.budget, allow_repeats=req.allow_repeats, limits=req.limits())
        if req.query is not None and req.user_id is None and req.events is None:
            out, cold, unknown, source = m.rec.query_bundles(req.query, **kw), False, [], "query"
        else:
            h = history(req)
            c = m.rec.bundle_constraints(h, **kw)
            if req.query is not None:
                out, source = m.rec.bundles_for(h, c, query=req.query), f"query+{h.source}"
            else:
                ranked = m.rec.recommend_histories([h], m.rec.bundle_pool(c))[0] if h.items else None
                out, source = m.rec.bundles_for(h, c, ranked), h.source
            cold, unknown = not h.items, h.unknown_items
        shown = [[i["item_id"] for i in b["items"]] for b in out]
        return BundleResponse(bundles=out, cold_start=cold, unknown_items=unknown, history_source=source, model=m.info,
                              **impression(req.user_id or req.session_id, "bundles", shown))

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return app


def app_from_env() -> FastAPI:
    """The uvicorn app factory (one call per worker process)."""
    return build_bare_app(**json.loads(os.environ[ENV]))


def serve_bare(export: str, port: int, workers: int = 1, token_file: Optional[str] = None,
               user_key_file: Optional[str] = None, torch_threads: int = 1, host: str = "127.0.0.1") -> None:
    """Run the bare app under uvicorn in the foreground (``workers`` processes)."""
    import uvicorn

    os.environ[ENV] = json.dumps({"export": export, "token_file": token_file, "user_key_file": user_key_file,
                                  "torch_threads": torch_threads})
    uvicorn.run("bundlerec.serving.bare:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning", access_log=False)


def start_bare(export: str, workers: int, token_file: str | None, user_key_file: str | None = None,
               timeout_s: float = 600) -> tuple:
    """The bare FastAPI app (:mod:`bundlerec.serving.bare`) on a free loopback port, in its own process
    group; returns (process, url) once it answers /healthz."""
    import sys

    def cmd(port: int) -> list:
        c = [sys.executable, "-m", "bundlerec.serving.bare", export, str(port), "--workers", str(workers)]
        c += ["--token-file", token_file] if token_file else []
        return c + (["--user-key-file", user_key_file] if user_key_file else [])

    return launch(cmd, "/healthz", timeout_s)


def launch(cmd, health_path: str, timeout_s: float = 600, env: Optional[dict] = None) -> tuple:
    """``cmd(port)`` started on a free loopback port in its own process group; returns (process, url)
    once ``health_path`` answers 200 (the process is stopped if it does not within ``timeout_s``)."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(cmd(port), start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd(port)[:3]} exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url + health_path, timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop_bare(proc)
    raise RuntimeError(f"{cmd(port)[:3]} did not answer {health_path} within {timeout_s:.0f} s")


def stop_bare(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()



if __name__ == "__main__":
    import typer

    typer.run(serve_bare)
