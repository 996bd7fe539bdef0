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
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from fastapi import Depends, HTTPException
from ray import serve

from bundlerec.config import ServeConfig
from bundlerec.serving import guards  # a module reference: see the note in bundlerec/serving/guards.py
from bundlerec.serving import metrics as serve_metrics  # a module reference: the replica sets METRICS
from bundlerec.serving.api import api
from bundlerec.serving.auth import TokenAuth
from bundlerec.serving.explorer import router as explorer_router
from bundlerec.serving.feedback import feedback_rows
from bundlerec.serving.following import RegistryFollower
from bundlerec.serving.guards import require_token
from bundlerec.serving.loading import Loaded, load
from bundlerec.pricing.demand import tightened
from bundlerec.serving.process import bind_internal_grpc_to_node_ip, lower_this_threads_priority
from bundlerec.serving.schemas import (
    ERROR_RESPONSES,
    BundleRequest,
    BundleResponse,
    CompletionRequest,
    CompletionResponse,
    FeedbackRequest,
    FeedbackResponse,
    RecommendationRequest,
    RecommendationResponse,
    feedback_links,
)

log = logging.getLogger("ray.serve")
api.include_router(explorer_router)  # before the ingress below reads the app's routes
DEFAULTS = ServeConfig()  # the one definition of every serve argument's default



@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress(api)
class BundlerecService(RegistryFollower):
    """One replica: the loaded model (pinned per request), the HTTP routes; the registry following
    comes as a mixin (:class:`~bundlerec.serving.following.RegistryFollower`), the explorer's routes as a
    router (:mod:`bundlerec.serving.explorer`)."""

    def __init__(self, model_uri: str, tracking_uri: Optional[str] = None, poll_s: float = DEFAULTS.poll_s,
                 torch_threads: int = DEFAULTS.torch_threads, auth: bool = DEFAULTS.auth,
                 auth_token_file: Optional[str] = None, user_key_file: Optional[str] = None,
                 max_body_bytes: int = DEFAULTS.max_body_bytes,
                 ann_min_items: int = DEFAULTS.ann_min_items, ann_nprobe: int = DEFAULTS.ann_nprobe,
                 model_cache_dir: Optional[str] = DEFAULTS.model_cache_dir,
                 max_concurrent_bundles: int = DEFAULTS.max_concurrent_bundles,
                 event_log_dir: Optional[str] = DEFAULTS.event_log_dir, event_flush_s: float = DEFAULTS.event_flush_s,
                 tracking_credentials_file: Optional[str] = None, admin_token_file: Optional[str] = None,
                 event_log_retention_days: float = DEFAULTS.event_log_retention_days,
                 rate_limit_rps: float = DEFAULTS.rate_limit_rps, rate_limit_burst: int = DEFAULTS.rate_limit_burst):
        import hashlib

        import torch

        bind_internal_grpc_to_node_ip()
        torch.set_num_threads(torch_threads)
        if tracking_credentials_file:  # MLflow with authentication: this replica's (read-only) identity
            from bundlerec.tracking import read_env_file

            creds = read_env_file(tracking_credentials_file)
            os.environ.update({k: v for k, v in creds.items() if k in ("MLFLOW_TRACKING_USERNAME",
                                                                       "MLFLOW_TRACKING_PASSWORD")})
        # auth=True with no token configured fails the replica at start (a clear deploy error, never an open door)
        if auth or auth_token_file or os.environ.get("BUNDLEREC_API_TOKENS"):
            guards.GUARDS.auth = TokenAuth(auth_token_file)
            # the explore routes (any shopper's history) take other tokens where the deployment has them
            guards.GUARDS.admin = TokenAuth(admin_token_file, env_var="BUNDLEREC_ADMIN_TOKENS") if admin_token_file else None
            log.info("bundlerec: bearer-token authentication on (%d token(s))", len(guards.GUARDS.auth))
        else:
            guards.GUARDS.auth = guards.GUARDS.admin = None
            log.warning("bundlerec: authentication is OFF (set serve args auth: true and a token)")
        from bundlerec.serving.edge import EdgePublisher, replica_settings  # what Serve's proxy refuses itself

        guards.GUARDS.edge = EdgePublisher(serve.get_replica_context().app_name, replica_settings(
            auth_token_file, admin_token_file, guards.GUARDS.auth is not None))
        guards.GUARDS.max_body_bytes = int(max_body_bytes)
        guards.GUARDS.limiter = guards.RateLimiter(rate_limit_rps, rate_limit_burst) if rate_limit_rps > 0 else None
        serve_metrics.METRICS = serve_metrics.ServeMetrics(serve_metrics.api_paths(api))
        self._bundle_slots = threading.BoundedSemaphore(int(max_concurrent_bundles))
        self._bundle_pool = ThreadPoolExecutor(int(max_concurrent_bundles), thread_name_prefix="bundles",
                                               initializer=lower_this_threads_priority)
        self.model_uri, self.tracking_uri = model_uri, tracking_uri
        self.replica = serve.get_replica_context().replica_id.unique_id  # /v1/model says which replica answered
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
        # --- online experiments: signed impression ids, durable impression/feedback logs, arms
        from bundlerec.experiments.event_log import OnlineLog
        from bundlerec.experiments.assignment import ImpressionSigner

        self.signer = ImpressionSigner(self.user_key or hashlib.sha256(f"bundlerec:{model_uri}".encode()).digest())
        self.log = OnlineLog(event_log_dir, event_flush_s, event_log_retention_days) if event_log_dir else None
        # recent (impression, event) keys, as 16-byte digests (an impression id is up to 2 KB): idempotency
        # within this replica, 500,000 keys in about 70 MB (the full keys took about 420 MB)
        self._seen: "OrderedDict[bytes, None]" = OrderedDict()
        self._seen_lock = threading.Lock()
        from bundlerec.serving.dedup import SharedKeys  # ... and across the application's replicas

        self.shared_keys = SharedKeys(serve.get_replica_context().replica_id.deployment_id.app_name) if self.log else None
        self.pricing_policy: Optional[dict] = None  # promoted onto the champion (registry tag bundlerec.pricing)
        self.experiment = None  # bundlerec.experiments.assignment.Experiment while one runs
        self.experiment_refused: Optional[dict] = None
        self._experiment_key: Optional[str] = None
        self.model_name = model_uri[len("models:/"):].split("@")[0].split("/")[0] if model_uri.startswith("models:/") else None
        if self.model_name:
            self._sync_experiment()
        self._stop = threading.Event()
        self.watcher: Optional[threading.Thread] = None
        self.watch_error: Optional[str] = None  # the last round's unexpected error, None after a clean one
        if poll_s > 0 and model_uri.startswith("models:/"):
            self.watcher = threading.Thread(target=self._watch, args=(poll_s,), daemon=True)
            self.watcher.start()

    def _route(self, user_id: Optional[str], session_id: Optional[str]):
        """(model, experiment name, arm, unit, new session id) for one request."""
        from bundlerec.experiments.assignment import new_session_id

        new = None
        unit = user_id or session_id
        if unit is None:
            unit = new = new_session_id()
        exp = self.experiment
        if exp is None:
            return self.current, None, None, unit, new
        arm, m = exp.route(unit)
        return m, exp.name, arm, unit, new

    def _policy(self, exp: Optional[str], arm: Optional[str]) -> Optional[dict]:
        """The pricing policy of a request's arm, else the one promoted onto the champion."""
        e = self.experiment
        own = e.pricing(arm) if e is not None and exp == e.name and arm in e.spec["arms"] else None
        return own if own is not None else self.pricing_policy

    def _impression(self, m: Loaded, exp: Optional[str], arm: Optional[str], unit: str, new_session: Optional[str],
                    endpoint: str, items: list, bundles: list) -> dict:
        """Issue the answer's impression id and log what was shown (before the answer goes out)."""
        shown = [[i["item_id"] for i in b["items"]] for b in bundles] if endpoint == "bundles" else [items]
        iid, f = self.signer.issue(unit, exp, arm, m.info.version, endpoint, shown)
        if self.log is not None:
            self._log_impression([{
                "impression_id": iid, "event_time": f["t"], "experiment": exp, "arm": arm, "model_name": m.info.name,
                "model_version": m.info.version, "endpoint": endpoint, "user_id": unit, "session_id": new_session,
                "items": items, "bundle_items": [[i["item_id"] for i in b["items"]] for b in bundles],
                "bundle_list_prices": [b.get("list_price") for b in bundles],
                "bundle_prices": [b.get("bundle_price") for b in bundles],
                "bundle_optimal_prices": [b.get("optimal_price") for b in bundles],
                "bundle_price_propensities": [b.get("price_propensity") for b in bundles]}])
        return {"impression_id": iid, "experiment": {"experiment": exp, "arm": arm} if exp else None,
                "session_id": new_session}

    def _log_impression(self, rows: list) -> None:
        """An impression into the event log; a storage fault degrades logging (counted, in /readyz),
        never the answer."""
        from bundlerec.experiments.event_log import LogUnavailable

        try:
            self.log.impressions.append(rows)
        except LogUnavailable as e:
            log.warning("bundlerec: impression not logged (the answer still goes out): %s", e)

    def _was_seen(self, key: bytes) -> bool:
        with self._seen_lock:
            return key in self._seen

    def __del__(self):
        self._stop.set()
        if getattr(self, "log", None) is not None:  # Serve calls this on graceful shutdown: flush
            self.log.close()

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
              responses={**ERROR_RESPONSES, **feedback_links("/items/0/item_id")})
    async def recommend(self, req: RecommendationRequest) -> RecommendationResponse:
        m, exp, arm, unit, new = self._route(req.user_id, req.session_id)  # the model is pinned for this request
        if req.events is not None:
            h = m.rec.history_from_events([e.model_dump() for e in req.events], now=req.as_of)
        else:
            h = m.rec.history_for_user(req.user_id)
        ranked = await self._score(m, h, req.k)
        items = m.rec.describe(ranked)
        shown = self._impression(m, exp, arm, unit, new, "recommendations", [i["item_id"] for i in items], [])
        if serve_metrics.METRICS is not None:
            serve_metrics.METRICS.answer("/v1/recommendations", h.source, len(h.unknown_items), experiment=exp, arm=arm)
        return RecommendationResponse(items=items, cold_start=not h.items, unknown_items=h.unknown_items,
                                      history_source=h.source, model=m.info, **shown)

    @api.post("/v1/bundles", response_model=BundleResponse, dependencies=[Depends(require_token)],
              responses={**ERROR_RESPONSES, **feedback_links("/bundles/0/items/0/item_id")})
    async def bundles(self, req: BundleRequest) -> BundleResponse:
        """Personalized bundles with optimized prices. At most ``max_concurrent_bundles`` at once per
        replica, computed in the replica's own low-priority threads (nice 19) so that the event loop,
        which answers recommendations, gets the CPU first; beyond that 503 + Retry-After right away:
        bundle work is shed before recommendations are."""
        if not self._bundle_slots.acquire(blocking=False):
            if serve_metrics.METRICS is not None:
                serve_metrics.METRICS.shed.inc()
            raise HTTPException(503, "bundle capacity of this replica is in use; retry shortly",
                                headers={"Retry-After": "1"})
        try:
            m, exp, arm, unit, new = self._route(req.user_id, req.session_id)
            kw = dict(n=req.n, max_size=req.max_size, budget=req.budget, allow_repeats=req.allow_repeats,
                      limits=tightened(req.limits(), self._policy(exp, arm)))
            loop = asyncio.get_running_loop()
            if req.query is not None and req.user_id is None and req.events is None:
                out = await loop.run_in_executor(self._bundle_pool, lambda: m.rec.query_bundles(req.query, **kw))
                cold, unknown, source = False, [], "query"
            elif req.query is not None:  # a description together with a history
                h = (m.rec.history_from_events([e.model_dump() for e in req.events], now=req.as_of)
                     if req.events is not None else m.rec.history_for_user(req.user_id))
                c = m.rec.bundle_constraints(h, **kw)
                out = await loop.run_in_executor(self._bundle_pool, lambda: m.rec.bundles_for(h, c, query=req.query))
                cold, unknown, source = not h.items, h.unknown_items, f"query+{h.source}"
            else:
                if req.events is not None:
                    h = m.rec.history_from_events([e.model_dump() for e in req.events], now=req.as_of)
                else:
                    h = m.rec.history_for_user(req.user_id)
                c = m.rec.bundle_constraints(h, **kw)
                # retrieval through the batcher (ANN index for large catalogs) with the recommendations
                ranked = await self._score(m, h, m.rec.bundle_pool(c)) if h.items else None
                out = await loop.run_in_executor(self._bundle_pool, m.rec.bundles_for, h, c, ranked)
                cold, unknown, source = not h.items, h.unknown_items, h.source
            shown = self._impression(m, exp, arm, unit, new, "bundles", [], out)
            if serve_metrics.METRICS is not None:
                serve_metrics.METRICS.answer("/v1/bundles", source, len(unknown), out, exp, arm)
            return BundleResponse(bundles=out, cold_start=cold, unknown_items=unknown, history_source=source,
                                  model=m.info, **shown)
        finally:
            self._bundle_slots.release()

    # ---------------------------------------------------------------- feedback and experiments
    @api.post("/v1/feedback", response_model=FeedbackResponse, dependencies=[Depends(require_token)],
              responses=ERROR_RESPONSES)
    def feedback(self, req: FeedbackRequest) -> FeedbackResponse:
        """What shoppers did with an answer: clicks, carts, purchases, accepted bundles, each against
        the ``impression_id`` of the answer. All events of a request are checked before any is
        written (422 names the first bad one); a repeated (impression_id, event_id) is counted once."""
        import time

        if self.log is None:
            raise HTTPException(503, "feedback is not recorded by this deployment (serve.event_log_dir is empty)")
        events, dup = feedback_rows(req.events, self.signer, self.current.rec, self._was_seen, int(time.time() * 1e6))
        from bundlerec.experiments.event_log import LogUnavailable

        fresh = self.shared_keys.claim([k for k, _ in events]) if self.shared_keys is not None and events else None
        if fresh is not None:  # another replica accepted some of these already: duplicates, not rows
            dup += fresh.count(False)
            events = [ev for ev, f in zip(events, fresh) if f]
        keys = [k for ks, _ in events for k in ks]
        try:
            self.log.feedback.append([r for _, rows in events for r in rows])  # durable (write-ahead) before the answer
        except LogUnavailable as e:  # nothing recorded: the client sends it again later
            if fresh is not None:
                self.shared_keys.release(keys)
            raise HTTPException(503, f"feedback not recorded, retry later: {e}", headers={"Retry-After": "5"}) from None
        with self._seen_lock:
            for k in keys:
                self._seen[k] = None
            while len(self._seen) > 500_000:
                self._seen.popitem(last=False)
        return FeedbackResponse(accepted=len(events), duplicates=dup)

    @api.get("/v1/experiment", dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)
    def experiment_state(self) -> dict:
        """The experiment this replica runs (registry spec with each arm's version), or none, and
        the last one it refused."""
        exp = self.experiment
        return {"experiment": exp.spec if exp else None, "refused": self.experiment_refused,
                "impressions_logged": self.log is not None}

    @api.post("/v1/bundles/complete", response_model=CompletionResponse, dependencies=[Depends(require_token)],
              responses={**ERROR_RESPONSES, **feedback_links("/items/0/item_id")})
    def complete(self, req: CompletionRequest) -> CompletionResponse:
        """The items that complete a cart: the bundle engine's completion, as ``jobs.eval_bundles``
        measures it (fusion weights from the export's bundle_engine.json). Like the other answers it
        carries an ``impression_id`` for feedback and, under an experiment, the arm that answered."""
        m, exp, arm, unit, new = self._route(req.user_id, req.session_id)
        out = m.rec.complete(req.items, req.k)
        shown = self._impression(m, exp, arm, unit, new, "complete", [i["item_id"] for i in out["items"]], [])
        if serve_metrics.METRICS is not None:
            serve_metrics.METRICS.answer("/v1/bundles/complete", "cart", len(out["unknown_items"]), experiment=exp, arm=arm)
        return CompletionResponse(**out, model=m.info, **shown)

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", responses={503: ERROR_RESPONSES[503]})
    def readyz(self) -> dict:
        if self.current is None:
            raise HTTPException(503, "model not loaded")
        if self.watcher is not None and not self.watcher.is_alive() and not self._stop.is_set():
            raise HTTPException(503, "not following the registry any more (the watch thread ended)")
        info = self.current.info  # open endpoint (probes): name/version only, no paths
        return {"status": "ready", "model": {"name": info.name, "version": info.version, "alias": info.alias},
                "refused_version": (self.refused or {}).get("version"),
                "experiment_refused": self.experiment_refused is not None, "watch_ok": self.watch_error is None,
                "event_log_ok": self.log.health()["ok"] if self.log is not None else None}  # details: /v1/model

    @api.get("/v1/model", dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)
    def model(self) -> dict:
        m = self.current
        return {**m.info.model_dump(), "replica": self.replica, "n_items": len(m.rec.item_ids), "history_len": m.rec.history_len,
                "reloads": self.reloads, "source": m.source, "refused": self.refused,
                "event_log": self.log.health() if self.log is not None else None,
                "feedback_keys": ({"shared": self.shared_keys.name, "last_error": self.shared_keys.last_error}
                                  if self.shared_keys is not None else None),
                "base_model": m.rec.meta.get("base_model"),
                "pricing": m.rec.bundle_engine.pricing_info if m.rec.bundle_engine else None,
                "pricing_policy": self.pricing_policy,
                "bundle_engine": m.rec.bundle_engine.params.__dict__ if m.rec.bundle_engine else None}


def build_app(args: dict) -> serve.Application:
    """Application builder for serve/config.yaml (``import_path: bundlerec.serving.app:build_app``);
    args not given take ServeConfig's defaults."""
    known = {"model_uri", "tracking_uri", "auth_token_file", "admin_token_file", "user_key_file", "tracking_credentials_file",
             *DEFAULTS.app_args()}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown Serve app args {sorted(unknown)}; known: {sorted(known)}")
    kw = {**DEFAULTS.app_args(), **{k: v for k, v in args.items() if k != "model_uri"}}
    return BundlerecService.bind(model_uri=args["model_uri"], **kw)
