"""The Serve app's operations metrics, exported through Ray's metrics (``ray.util.metrics``): each
node's metrics agent serves them in Prometheus format on the node's metrics export port, named with
Ray's ``ray_`` prefix (``ray_bundlerec_requests_total`` ...), beside Ray Serve's own.

* ``bundlerec_requests`` (route, status) and ``bundlerec_request_latency_ms`` (route): every HTTP
  request, 401/413/422/503 included; routes outside the API are counted as ``other`` (no label from a
  caller's path);
* ``bundlerec_answers`` (route, history_source): answered requests by where the history came from
  (``cold_start`` / all = the cold-start share), ``bundlerec_unknown_items`` (route): request items not
  in the catalog;
* ``bundlerec_bundles_priced`` (price_source): served bundles by what priced them;
* ``bundlerec_bundles_shed``: bundle requests answered 503 because the replica's bundle slots were busy;
* ``bundlerec_experiment_answers`` (experiment, arm): answers per online-experiment arm.
"""

from __future__ import annotations

import time
from typing import Optional

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


class ServeMetrics:
    def __init__(self, routes: set):
        from ray.util.metrics import Counter, Histogram

        self.routes = set(routes)
        self.requests = Counter("bundlerec_requests", "HTTP requests by route and status code", tag_keys=("route", "status"))
        self.latency = Histogram("bundlerec_request_latency_ms", "HTTP request latency in the replica (ms)",
                                 boundaries=LATENCY_MS, tag_keys=("route",))
        self.answers = Counter("bundlerec_answers", "answered requests by history source", tag_keys=("route", "history_source"))
        self.unknown = Counter("bundlerec_unknown_items", "request items not in the catalog", tag_keys=("route",))
        self.priced = Counter("bundlerec_bundles_priced", "served bundles by price source", tag_keys=("price_source",))
        self.shed = Counter("bundlerec_bundles_shed", "bundle requests shed with 503 (bundle slots busy)")
        self.arms = Counter("bundlerec_experiment_answers", "answers per experiment arm", tag_keys=("experiment", "arm"))

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"

    def request(self, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        self.requests.inc(1, {"route": route, "status": str(int(status))})
        self.latency.observe(seconds * 1000.0, {"route": route})

    def answer(self, route: str, history_source: str, unknown_items: int = 0, bundles: Optional[list] = None,
               experiment: Optional[str] = None, arm: Optional[str] = None) -> None:
        self.answers.inc(1, {"route": route, "history_source": history_source})
        if unknown_items:
            self.unknown.inc(unknown_items, {"route": route})
        for b in bundles or ():
            source = str(b.get("price_source") or "none")
            self.priced.inc(1, {"price_source": source if not source.startswith("none") else "none"})
        if experiment:
            self.arms.inc(1, {"experiment": str(experiment), "arm": str(arm)})


def api_paths(app) -> set:
    """The app's route paths, those of included routers too (Serve's ingress includes the routes
    declared on the deployment class as a router)."""
    out, todo = set(), list(app.routes)
    while todo:
        r = todo.pop()
        if getattr(r, "path", None):
            out.add(r.path)
        inner = getattr(r, "routes", None) or getattr(getattr(r, "original_router", None), "routes", None)
        todo.extend(inner or [])
    return out


METRICS: Optional[ServeMetrics] = None  # set by the replica (bundlerec.serving.app.BundlerecService)


async def record_request(request, call_next):
    """HTTP middleware: every request's route, status and latency (outermost, so refusals count)."""
    t = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        if METRICS is not None:
            METRICS.request(request.url.path, status, time.perf_counter() - t)
