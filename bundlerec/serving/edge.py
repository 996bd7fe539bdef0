"""Requests refused in Ray Serve's HTTP proxy, before they cost a replica anything.

Every request Serve's Python proxy forwards costs a replica hop (about 12 ms of replica CPU per
request on the 2-core box, docs/benchmarks.md), whatever the replica then answers. A client without
a token (or with a body for a route that takes none) could take the replicas' CPU from the shoppers
at the rate it chooses: measured with ``bundlerec loadtest --slow-bodies 200``, 200 such connections
took the authenticated p99 from 97 ms to 9.4 s and made Serve restart its proxy. :class:`EdgeGuard`
is an ASGI middleware that the proxy runs in front of its router
(``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=bundlerec.serving.edge:proxy_middlewares``, set where
Ray starts: ``bundlerec.runtime.ENV_DEFAULTS``) and that answers, without forwarding and without
reading a byte of the body, what the replica's own guards (:mod:`bundlerec.serving.guards`) would
answer anyway:

    405 -- a body (POST, PUT, PATCH) for a route outside ``/v1/``
    401 -- a ``/v1/`` request without ``Authorization: Bearer …`` where the app has authentication on
    403 -- a bearer token that is none of the app's tokens (API or admin), where its token files can
           be read from the proxy's node

Each refusal carries ``X-Refused-By: proxy`` and is counted in the Ray metric
``bundlerec_edge_refused_total`` (by status; Prometheus reads it as ``ray_bundlerec_edge_refused_total``
beside the replicas' ``ray_bundlerec_requests_total``). Everything else goes to the replica unchanged, which checks again (which token class a route
takes, rate limits, body limits). The guard learns each application's route prefix and token files
from a small detached actor that the application's replicas fill and renew (:class:`EdgePublisher`:
at start, from the first request's route prefix, every 30 s); an application not renewed for 90 s
is forgotten, and until one is known the guard lets every request through. Serve's HAProxy
ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``) does not run Python middleware: there the replicas'
guards answer alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Optional

import ray

from bundlerec.serving.auth import INVALID, MISSING, bearer_token

log = logging.getLogger("ray.serve")

NAME, NAMESPACE = "bundlerec-edge", "bundlerec"
REFRESH_S = 5.0
BODY_METHODS = ("POST", "PUT", "PATCH")


LEASE_S = 90.0  # an application's settings are forgotten this long after its replicas last renewed them
RENEW_S = 30.0


@ray.remote(num_cpus=0, max_restarts=-1)
class EdgeSettings:
    """Each live application's settings, as its replicas publish and renew them: app name ->
    {"prefix", "auth", "token_files": [[file, env var], ...], "verify"} and when it was renewed."""

    def __init__(self):
        self.apps: dict = {}

    def publish(self, app_name: str, settings: dict) -> None:
        self.apps[app_name] = (time.time(), settings)

    def get(self) -> dict:
        """Route prefix -> settings of the applications renewed within LEASE_S whose prefix is known."""
        now = time.time()
        return {s["prefix"]: s for t, s in self.apps.values() if now - t < LEASE_S and s.get("prefix")}


def replica_settings(auth_token_file: Optional[str], admin_token_file: Optional[str], auth: bool) -> dict:
    """What the guard needs of a replica's application: whether it takes tokens and the token files
    to check them against. Where this replica's environment adds tokens (``BUNDLEREC_API_TOKENS``,
    ``BUNDLEREC_ADMIN_TOKENS``: the proxy may not have them) the proxy answers 401 only and leaves
    403 to the replicas (``verify`` false)."""
    import os

    from bundlerec.serving.auth import TOKENS_ENV

    files = [[os.path.abspath(f), var] for f, var in ((auth_token_file, TOKENS_ENV),
                                                      (admin_token_file, "BUNDLEREC_ADMIN_TOKENS")) if f]
    env_tokens = bool(os.environ.get(TOKENS_ENV) or os.environ.get("BUNDLEREC_ADMIN_TOKENS"))
    return {"prefix": None, "auth": bool(auth), "token_files": files, "verify": bool(files) and not env_tokens}


class EdgePublisher:
    """A replica's side: publishes its application's settings at start and renews them every
    RENEW_S from a daemon thread (an application deleted or redeployed differently is forgotten by
    the proxies after LEASE_S); its route prefix is learnt from the first request it serves
    (:meth:`saw`, called by the body guard with the request's ``root_path``)."""

    def __init__(self, app_name: str, settings: dict):
        import threading

        self.app_name, self.settings = app_name, dict(settings)
        self._wake = threading.Event()
        threading.Thread(target=self._renew, daemon=True, name="bundlerec-edge").start()

    def saw(self, root_path: str) -> None:
        prefix = root_path or "/"
        if self.settings["prefix"] != prefix:
            self.settings["prefix"] = prefix
            self._wake.set()  # publish now, not at the next renewal

    def _renew(self) -> None:
        actor = None
        while True:
            try:
                if actor is None:
                    actor = EdgeSettings.options(name=NAME, namespace=NAMESPACE, lifetime="detached",
                                                 get_if_exists=True).remote()
                ray.get(actor.publish.remote(self.app_name, dict(self.settings)), timeout=10)
            except Exception as e:  # the proxies keep what they had until the lease ends
                actor = None
                log.warning("bundlerec: could not publish the proxy guard's settings: %s", e)
            self._wake.wait(RENEW_S)
            self._wake.clear()


class EdgeGuard:
    """ASGI middleware of the Serve proxy (see the module docstring); ``settings`` fixes the
    applications instead of reading them from the actor (tests, other proxies)."""

    def __init__(self, app, settings: Optional[dict] = None, refresh_s: float = REFRESH_S):
        self.app, self.refresh_s = app, refresh_s
        self.fixed = settings is not None
        self.apps: dict = {}
        self.auth: dict = {}  # token file -> TokenAuth (None where the proxy cannot read it)
        self._next = self._fresh = 0.0
        self._task: Optional[asyncio.Task] = None
        self.refused = _refusal_counter()
        if settings is not None:
            self._take(settings)

    def _take(self, apps: dict) -> None:
        from bundlerec.serving.auth import TokenAuth

        for s in apps.values():
            for f, var in s.get("token_files", []):
                if f not in self.auth:
                    try:  # the file + the cluster's environment variable, as the replicas read them
                        self.auth[f] = TokenAuth(f, env_var=var)
                    except Exception as e:  # not on this node: the replica decides 403 alone
                        log.warning("bundlerec edge: token file %s not readable here (%s)", f, type(e).__name__)
                        self.auth[f] = None
        self.apps = dict(sorted(apps.items(), key=lambda kv: -len(kv[0])))  # longest prefix first

    async def _refresh(self) -> None:
        try:
            actor = await asyncio.to_thread(ray.get_actor, NAME, NAMESPACE)
            self._take(await actor.get.remote())
            self._fresh = time.monotonic()
        except Exception:  # nothing published yet, or the actor restarting: what is known, for a lease
            if time.monotonic() - self._fresh > LEASE_S:
                self.apps = {}

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if self.fixed or now < self._next or (self._task is not None and not self._task.done()):
            return
        self._next = now + self.refresh_s
        self._task = asyncio.get_running_loop().create_task(self._refresh())

    def decide(self, method: str, path: str, authorization: Optional[str]) -> Optional[tuple[int, str, dict]]:
        """(status, detail, headers) to answer here, or None to forward the request."""
        for prefix, s in self.apps.items():
            if not path.startswith(prefix):
                continue
            rel = path if prefix == "/" else "/" + path[len(prefix):].lstrip("/")
            if not rel.startswith("/v1/"):
                return (405, "this route takes no request body", {"Connection": "close"}) if method in BODY_METHODS else None
            if not s.get("auth"):
                return None
            token = bearer_token(authorization)
            if token is None:
                return 401, MISSING, {"WWW-Authenticate": "Bearer", "Connection": "close"}
            checks = [self.auth.get(f) for f, _ in s.get("token_files", [])]
            if s.get("verify") and checks and all(c is not None for c in checks) and not any(c.verify(token) for c in checks):
                return 403, INVALID, {"Connection": "close"}
            return None
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self._maybe_refresh()
        authorization = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None)
        answer = self.decide(scope["method"], scope["path"], authorization)
        if answer is None:
            return await self.app(scope, receive, send)
        status, detail, headers = answer
        if self.refused is not None:
            self.refused.inc(tags={"status": str(status)})
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"x-refused-by", b"proxy"),
                                *((k.lower().encode(), v.encode()) for k, v in headers.items())]})
        await send({"type": "http.response.body", "body": body})


def _refusal_counter():
    """The proxy's refusal counter (a Ray metric), or None outside a Ray worker (tests)."""
    try:
        from ray.util.metrics import Counter

        if not ray.is_initialized():
            return None
        return Counter("bundlerec_edge_refused_total", "requests the Serve proxy refused itself (bundlerec.serving.edge)",
                       tag_keys=("status",))
    except Exception:
        return None


def proxy_middlewares() -> list:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names: the proxy's middleware list."""
    from starlette.middleware import Middleware

    return [Middleware(EdgeGuard)]
