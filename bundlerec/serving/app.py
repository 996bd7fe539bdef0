"""The Ray Serve deployment: the registered champion answers recommendations and bundles over HTTP.

    serve run serve/config.yaml                     # foreground, local
    serve deploy serve/config.yaml                  # to the running cluster (same as python -m jobs.deploy)
    curl -s -X POST http://127.0.0.1:8000/v1/recommendations -H 'content-type: application/json' \
         -d '{"user_id": "U0000007", "k": 5}'
    curl -s -X POST http://127.0.0.1:8000/v1/bundles/complete -H 'content-type: application/json' \
         -d '{"items": ["I000001"], "k": 5}'

The model is loaded once per replica (MLflow registry alias, version or a local export dir), the
item index is precomputed at export time, and requests are micro-batched with ``@serve.batch``.
A background thread polls the alias; when it moves, the new version is loaded beside the old one and
swapped in atomically, so in-flight requests finish on the model they started with.

Guards: bearer-token authentication (``auth: true`` + ``auth_token_file`` or $BUNDLEREC_API_TOKENS;
401 without a token, 403 with a wrong one; /healthz and /readyz stay open for probes), a request-body
limit (413), pydantic bounds on k/n/bundle size/history length (422), and overload answered by Serve
itself with 503 + Retry-After once ``max_queued_requests`` is reached (serve/config.yaml).
"""


import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse
from fastapi.exceptions import RequestValidationError
from ray import serve

from bundlerec.config import ServeConfig
from bundlerec.serving.auth import TokenAuth
from bundlerec.serving import guards  # a module reference: see the note in bundlerec/serving/guards.py
from bundlerec.serving.guards import limit_body, require_token, validation_error
from bundlerec.serving.schemas import (
    ERROR_RESPONSES,
    BundleRequest,
    BundleResponse,
    CompletionRequest,
    CompletionResponse,
    HistoryRequest,
    HistoryResponse,
    ItemSearchResponse,
    ModelInfo,
    RecommendationRequest,
    RecommendationResponse,
    UserSample,
)

log = logging.getLogger("ray.serve")
DEFAULTS = ServeConfig()  # the one definition of every serve argument's default

api = FastAPI(title="bundlerec", version="0.1.0",
              description="Personalized recommendations and priced bundles from the bundlerec champion model.")
api.middleware("http")(limit_body)
api.exception_handler(RequestValidationError)(validation_error)


@dataclass
class Loaded:
    rec: Any  # bundlerec.serving.recommender.Recommender
    info: ModelInfo
    source: str = "registry"  # registry | local copy (registry unreachable) | export dir
    local: Optional[str] = None  # the verified local copy it was loaded from (ModelStore)


def _resolve(model_uri: str, tracking_uri: Optional[str]) -> tuple[str, Optional[str], Optional[str]]:
    """models:/name@alias -> (models:/name/<version>, version, alias); other URIs unchanged."""
    if not model_uri.startswith("models:/"):
        return model_uri, None, None
    import mlflow

    from bundlerec.tracking import one_try

    name, _, ref = model_uri[len("models:/"):].partition("@")
    if ref:
        with one_try(10):  # a registry that is down answers in seconds, not after minutes of retries
            mv = mlflow.MlflowClient(tracking_uri).get_model_version_by_alias(name, ref)
        return f"models:/{name}/{mv.version}", str(mv.version), ref
    name, _, version = model_uri[len("models:/"):].partition("/")
    return model_uri, version or None, None


def canned_check(rec) -> None:
    """A new model must answer before it serves: a recommendation and a bundle for a two-event
    session, with finite scores. Raises ValueError saying what failed."""
    import math
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    h = rec.history_from_events([{"item_id": i, "event_type": t, "event_time": now - timedelta(minutes=m)}
                                 for i, t, m in zip(rec.item_ids[:2], ("view", "cart"), (5, 1))])
    ranked = rec.recommend_histories([h], 5)[0]
    if len(ranked) != min(5, len(rec.item_ids)) or not all(math.isfinite(float(s)) for _, s in ranked):
        raise ValueError(f"canned request: {len(ranked)} items, scores {[float(s) for _, s in ranked][:5]}")
    if rec.bundle_engine is not None:
        rec.bundles(h, n=1)


def load(model_uri: str, tracking_uri: Optional[str], ann: Optional[dict] = None,
         user_key: Optional[bytes] = None, store=None) -> Loaded:
    """Load, verify (the export's manifest) and check (a canned request) what ``model_uri`` names.
    ``store`` (bundlerec.serving.model_store.ModelStore): registry versions are downloaded into it,
    and when the registry cannot be reached the last good version kept there is loaded instead."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    source, local = "registry", None
    try:
        uri, version, alias = _resolve(model_uri, tracking_uri)
    except Exception as e:
        kept = store.last_good(model_uri) if store is not None else None
        if kept is None:
            raise
        log.warning("bundlerec: registry unreachable (%s); serving the last good local copy, %s version %s",
                    e, kept["name"], kept["version"])
        uri, version, alias, local = f"models:/{kept['name']}/{kept['version']}", kept["version"], None, kept["path"]
        source = "local copy (registry unreachable)"
    if uri.startswith("models:/") or uri.startswith("runs:/"):
        name = uri[len("models:/"):].split("/")[0] if uri.startswith("models:/") else "bundlerec"
        if local is None:
            local = store.fetch(uri, name, version) if store is not None and version and uri.startswith("models:/") else uri
        try:
            rec = mlflow.pyfunc.load_model(local).unwrap_python_model().rec  # verifies the export's manifest
        except Exception:
            if store is not None and source.startswith("local copy"):
                store.discard(local)  # a kept copy that no longer verifies is of no use to any replica
            # a fresh download that fails is left for ModelStore.remember's pruning: replicas on this
            # node share the store, and another one may be reading that folder right now
            raise
        rec.user_key = user_key
    else:
        from bundlerec.serving.recommender import Recommender

        rec, name, source = Recommender.from_export(uri, user_key), os.path.basename(os.path.normpath(uri)), "export dir"
    if rec.pseudonymized and user_key is None:
        raise RuntimeError(f"{uri}: its user ids are pseudonymized; give the Serve app the key (arg user_key_file, "
                           "serve.user_key_file) or shoppers would only be found by pseudonym")
    if ann:  # approximate top-k for large catalogs (bundlerec.serving.ann)
        rec.configure_ann(**ann)
    canned_check(rec)
    return Loaded(rec, ModelInfo(name=name, version=version, alias=alias, uri=uri), source, local)


def _lower_this_threads_priority(nice: int = 19) -> None:
    """Raise the calling thread's nice value (Linux: per thread; needs no privilege): the bundle
    pool's threads, so that the replica's event loop, which answers recommendations, gets the CPU first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not allowed: keep the default priority
        pass


def bind_internal_grpc_to_node_ip() -> None:
    """Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on ``[::]:0``, i.e. on
    every interface of the machine, although nothing uses it unless RAY_SERVE_USE_GRPC_BY_DEFAULT=1
    (found by listing the demo's sockets: tests/test_registry_serve.py). Called in the replica's
    constructor, which Serve runs before it starts that server: bind it to this node's own address
    (127.0.0.1 on one machine) instead. A Ray without this hook is left as it is."""
    import ray
    from ray.serve._private import replica as serve_replica

    original = getattr(serve_replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "bundlerec_bound", False):
        return
    ip = ray.util.get_node_ip_address()

    def bind(server, address: str):
        if address.startswith("[::]:"):
            address = f"{f'[{ip}]' if ':' in ip else ip}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    bind.bundlerec_bound = True
    serve_replica.add_port_to_grpc_server = bind


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress(api)
class BundlerecService:
    """One replica: the loaded model (pinned per request), the alias watcher, the HTTP routes."""

    def __init__(self, model_uri: str, tracking_uri: Optional[str] = None, poll_s: float = DEFAULTS.poll_s,
                 torch_threads: int = DEFAULTS.torch_threads, auth: bool = DEFAULTS.auth,
                 auth_token_file: Optional[str] = None, user_key_file: Optional[str] = None,
                 max_body_bytes: int = DEFAULTS.max_body_bytes,
                 ann_min_items: int = DEFAULTS.ann_min_items, ann_nprobe: int = DEFAULTS.ann_nprobe,
                 model_cache_dir: Optional[str] = DEFAULTS.model_cache_dir,
                 max_concurrent_bundles: int = DEFAULTS.max_concurrent_bundles):
        import torch

        bind_internal_grpc_to_node_ip()
        torch.set_num_threads(torch_threads)
        # auth=True with no token configured fails the replica at start (a clear deploy error, never an open door)
        if auth or auth_token_file or os.environ.get("BUNDLEREC_API_TOKENS"):
            guards.GUARDS.auth = TokenAuth(auth_token_file)
            log.info("bundlerec: bearer-token authentication on (%d token(s))", len(guards.GUARDS.auth))
        else:
            guards.GUARDS.auth = None
            log.warning("bundlerec: authentication is OFF (set serve args auth: true and a token)")
        guards.GUARDS.max_body_bytes = int(max_body_bytes)
        self._bundle_slots = threading.BoundedSemaphore(int(max_concurrent_bundles))
        self._bundle_pool = ThreadPoolExecutor(int(max_concurrent_bundles), thread_name_prefix="bundles",
                                               initializer=_lower_this_threads_priority)
        self.model_uri, self.tracking_uri = model_uri, tracking_uri
        self.ann = {"min_items": ann_min_items, "nprobe": ann_nprobe, "threads": torch_threads}
        from bundlerec.privacy import read_user_key

        self.user_key = read_user_key(user_key_file) if user_key_file else None
        from bundlerec.serving.model_store import ModelStore

        self.store = ModelStore(model_cache_dir, tracking_uri) if model_cache_dir and model_uri.startswith("models:/") else None
        self.refused: Optional[dict] = None  # the last version that failed to load or answer
        try:
            self.current: Loaded = load(model_uri, tracking_uri, self.ann, self.user_key, self.store)
        except Exception as e:  # e.g. a broken champion at restart: the last good version, if there is one
            kept = self.store.last_good(model_uri) if self.store is not None else None
            if kept is None:
                raise
            self._refuse(None, e)
            self.current = load(f"models:/{kept['name']}/{kept['version']}", tracking_uri, self.ann, self.user_key,
                                self.store)
            self.current.source = "last good local copy (champion refused)"
        self._remember(self.current)
        self.reloads = 0
        self._stop = threading.Event()
        if poll_s > 0 and "@" in model_uri:
            threading.Thread(target=self._watch, args=(poll_s,), daemon=True).start()

    def _remember(self, m: Loaded) -> None:
        if self.store is not None and m.info.version and m.local and m.info.uri.startswith("models:/"):
            self.store.remember(self.model_uri, m.info.name, m.info.version, m.local)

    def _refuse(self, version: Optional[str], e: Exception) -> None:
        from datetime import datetime, timezone

        self.refused = {"version": version, "error": f"{type(e).__name__}: {e}"[:500],
                        "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        log.error("bundlerec: refused %s version %s, still serving version %s: %s", self.model_uri, version,
                  getattr(getattr(self, "current", None), "info", None) and self.current.info.version, e)

    def _watch(self, poll_s: float) -> None:
        """Follow the alias: load and check a moved champion beside the old one, then swap the
        reference. A version that fails (manifest, load, canned request) is refused once and the
        old one keeps serving; it is retried only when the alias moves again."""
        while not self._stop.wait(poll_s):
            try:
                _, version, _ = _resolve(self.model_uri, self.tracking_uri)
            except Exception as e:  # registry hiccup: keep serving the loaded model
                log.warning("bundlerec: alias check failed: %s", e)
                continue
            if not version or version == self.current.info.version or (self.refused or {}).get("version") == version:
                continue
            try:
                new = load(self.model_uri, self.tracking_uri, self.ann, self.user_key, self.store)
            except Exception as e:
                self._refuse(version, e)
                continue
            self.current = new  # atomic: requests in flight keep the object they hold
            self.refused = None
            self.reloads += 1
            self._remember(new)
            log.info("bundlerec: reloaded %s -> version %s", self.model_uri, new.info.version)

    def __del__(self):
        self._stop.set()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0005)
    async def _score(self, models: list, histories: list, ks: list) -> list:
        out: list = [None] * len(models)
        for m in {id(x): x for x in models}.values():  # normally one model; two only during a swap
            idx = [i for i, x in enumerate(models) if x is m]
            ranked = m.rec.recommend_histories([histories[i] for i in idx], max(ks[i] for i in idx))
            for i, r in zip(idx, ranked):
                out[i] = r[:ks[i]]
        return out

    @api.post("/v1/recommendations", response_model=RecommendationResponse, dependencies=[Depends(require_token)],
              responses=ERROR_RESPONSES)
    async def recommend(self, req: RecommendationRequest) -> RecommendationResponse:
        m = self.current  # pinned for this request
        if req.events is not None:
            h = m.rec.history_from_events([e.model_dump() for e in req.events])
        else:
            h = m.rec.history_for_user(req.user_id)
        ranked = await self._score(m, h, req.k)
        return RecommendationResponse(items=m.rec.describe(ranked), cold_start=not h.items,
                                      unknown_items=h.unknown_items, history_source=h.source, model=m.info)

    @api.post("/v1/bundles", response_model=BundleResponse, dependencies=[Depends(require_token)],
              responses=ERROR_RESPONSES)
    async def bundles(self, req: BundleRequest) -> BundleResponse:
        """Personalized bundles with optimized prices. At most ``max_concurrent_bundles`` at once per
        replica, computed in the replica's own low-priority threads (nice 19) so that the event loop,
        which answers recommendations, gets the CPU first; beyond that 503 + Retry-After right away:
        bundle work is shed before recommendations are."""
        if not self._bundle_slots.acquire(blocking=False):
            raise HTTPException(503, "bundle capacity of this replica is in use; retry shortly",
                                headers={"Retry-After": "1"})
        try:
            return await asyncio.get_running_loop().run_in_executor(self._bundle_pool, self._bundles, req)
        finally:
            self._bundle_slots.release()

    def _bundles(self, req: BundleRequest) -> BundleResponse:
        m = self.current
        kw = dict(n=req.n, max_size=req.max_size, budget=req.budget, allow_repeats=req.allow_repeats,
                  limits=req.limits())
        if req.query is not None:
            return BundleResponse(bundles=m.rec.query_bundles(req.query, **kw), cold_start=False, unknown_items=[],
                                  history_source="query", model=m.info)
        if req.events is not None:
            h = m.rec.history_from_events([e.model_dump() for e in req.events])
        else:
            h = m.rec.history_for_user(req.user_id)
        out = m.rec.bundles(h, **kw)
        return BundleResponse(bundles=out, cold_start=not h.items, unknown_items=h.unknown_items,
                              history_source=h.source, model=m.info)

    @api.post("/v1/bundles/complete", response_model=CompletionResponse, dependencies=[Depends(require_token)],
              responses=ERROR_RESPONSES)
    def complete(self, req: CompletionRequest) -> CompletionResponse:
        """The items that complete a cart: the bundle engine's completion, as ``jobs.eval_bundles``
        measures it (fusion weights from the export's bundle_engine.json)."""
        m = self.current
        return CompletionResponse(**m.rec.complete(req.items, req.k), model=m.info)

    # ---------------------------------------------------------------- the bundle explorer page
    @api.get("/", include_in_schema=False)
    def explorer(self) -> HTMLResponse:
        """The bundle explorer: a static page (no external script, style or font) that calls the
        authenticated API below with the token typed into it (kept in the tab's sessionStorage)."""
        from bundlerec.serving.explorer import page

        html, csp = page()
        return HTMLResponse(html, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    @api.get("/v1/explore/users", response_model=UserSample, dependencies=[Depends(require_token)],
             responses=ERROR_RESPONSES)
    def explore_users(self, n: int = Query(10, ge=1, le=50)) -> UserSample:
        """Sample shoppers of the model's data snapshot (the explorer's picker)."""
        return UserSample(users=self.current.rec.sample_users(n))

    @api.post("/v1/explore/history", response_model=HistoryResponse, dependencies=[Depends(require_token)],
              responses=ERROR_RESPONSES)
    def explore_history(self, req: HistoryRequest) -> HistoryResponse:
        """The history the model reads for a user (what recommendations and bundles start from)."""
        m = self.current
        h = m.rec.history_for_user(req.user_id)
        return HistoryResponse(events=m.rec.describe_history(h), history_source=h.source, model=m.info)

    @api.get("/v1/explore/items", response_model=ItemSearchResponse, dependencies=[Depends(require_token)],
             responses=ERROR_RESPONSES)
    def explore_items(self, q: str = Query("", max_length=100), limit: int = Query(10, ge=1, le=50)) -> ItemSearchResponse:
        """Catalog items whose id or title contains ``q`` (the explorer's cart)."""
        m = self.current
        return ItemSearchResponse(items=m.rec.search_items(q, limit), model=m.info)

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", responses={503: ERROR_RESPONSES[503]})
    def readyz(self) -> dict:
        if self.current is None:
            raise HTTPException(503, "model not loaded")
        info = self.current.info  # open endpoint (probes): name/version only, no paths
        return {"status": "ready", "model": {"name": info.name, "version": info.version, "alias": info.alias},
                "refused_version": (self.refused or {}).get("version")}

    @api.get("/v1/model", dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)
    def model(self) -> dict:
        m = self.current
        return {**m.info.model_dump(), "n_items": len(m.rec.item_ids), "history_len": m.rec.history_len,
                "reloads": self.reloads, "source": m.source, "refused": self.refused,
                "base_model": m.rec.meta.get("base_model"),
                "pricing": m.rec.bundle_engine.pricing_info if m.rec.bundle_engine else None,
                "bundle_engine": m.rec.bundle_engine.params.__dict__ if m.rec.bundle_engine else None}


def build_app(args: dict) -> serve.Application:
    """Application builder for serve/config.yaml (``import_path: bundlerec.serving.app:build_app``);
    args not given take ServeConfig's defaults."""
    known = {"model_uri", "tracking_uri", "auth_token_file", "user_key_file", *DEFAULTS.app_args()}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown Serve app args {sorted(unknown)}; known: {sorted(known)}")
    kw = {**DEFAULTS.app_args(), **{k: v for k, v in args.items() if k != "model_uri"}}
    return BundlerecService.bind(model_uri=args["model_uri"], **kw)
