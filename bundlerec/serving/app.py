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
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse
from fastapi.exceptions import RequestValidationError
from ray import serve

from bundlerec.config import ServeConfig
from bundlerec.serving.auth import TokenAuth
from bundlerec.serving import guards  # a module reference: see the note in bundlerec/serving/guards.py
from bundlerec.serving import metrics as serve_metrics  # a module reference: the replica sets METRICS
from bundlerec.serving.guards import limit_body, require_admin, require_token, validation_error
from bundlerec.serving.schemas import (
    feedback_links,
    ERROR_RESPONSES,
    FEEDBACK_EVENT_TYPE,
    BundleRequest,
    BundleResponse,
    CompletionRequest,
    CompletionResponse,
    FeedbackRequest,
    FeedbackResponse,
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
api.middleware("http")(serve_metrics.record_request)  # added last: outermost, so refusals are counted too
api.exception_handler(RequestValidationError)(validation_error)


@dataclass
class Loaded:
    rec: Any  # bundlerec.inference.recommender.Recommender
    info: ModelInfo
    source: str = "registry"  # registry | local copy (registry unreachable) | export dir
    local: Optional[str] = None  # the verified local copy it was loaded from (ModelStore)
    digest: Optional[str] = None  # the export's manifest digest pinned in the registry (checked at load)


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
    from bundlerec.registry.promotion import EXPORT_DIGEST_TAG, load_verified

    source, local, pinned = "registry", None, None
    try:
        uri, version, alias = _resolve(model_uri, tracking_uri)
    except Exception as e:
        kept = store.last_good(model_uri) if store is not None else None
        if kept is None:
            raise
        log.warning("bundlerec: registry unreachable (%s); serving the last good local copy, %s version %s",
                    e, kept["name"], kept["version"])
        uri, version, alias, local = f"models:/{kept['name']}/{kept['version']}", kept["version"], None, kept["path"]
        source, pinned = "local copy (registry unreachable)", kept.get("digest")
    if uri.startswith("runs:/"):
        raise ValueError(f"{uri}: serve a registered version (models:/<name>/<version> or @<alias>): only those "
                         "carry the pinned digest their export is checked against")
    if uri.startswith("models:/"):
        name = uri[len("models:/"):].split("/")[0]
        if source == "registry":  # from the registry, written by the training identity at registration
            from bundlerec.tracking import one_try

            with one_try(10):
                pinned = mlflow.MlflowClient(tracking_uri).get_model_version(name, version).tags.get(EXPORT_DIGEST_TAG)
        fresh = local is None
        if fresh:
            local = (store.fetch(uri, name, version) if store is not None and version
                     else mlflow.artifacts.download_artifacts(artifact_uri=uri))
        try:  # no code of the registered model runs: its export is read, after the pinned digest matches
            rec = load_verified(local, pinned, user_key)
        except Exception:
            if store is not None and source.startswith("local copy"):
                store.discard(local)  # a kept copy that no longer verifies is of no use to any replica
            # a fresh download that fails is left for ModelStore.remember's pruning: replicas on this
            # node share the store, and another one may be reading that folder right now
            raise
        finally:
            if store is not None and fresh:
                store.release(local)  # loaded (or refused): this replica's pruning lease ends
    else:
        from bundlerec.inference.recommender import Recommender

        rec, name, source = Recommender.from_export(uri, user_key), os.path.basename(os.path.normpath(uri)), "export dir"
    if rec.pseudonymized and user_key is None:
        raise RuntimeError(f"{uri}: its user ids are pseudonymized; give the Serve app the key (arg user_key_file, "
                           "serve.user_key_file) or shoppers would only be found by pseudonym")
    if ann:  # approximate top-k for large catalogs (bundlerec.inference.ann)
        rec.configure_ann(**ann)
    canned_check(rec)
    return Loaded(rec, ModelInfo(name=name, version=version, alias=alias, uri=uri), source, local, pinned)


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
                 max_concurrent_bundles: int = DEFAULTS.max_concurrent_bundles,
                 event_log_dir: str = DEFAULTS.event_log_dir, event_flush_s: float = DEFAULTS.event_flush_s,
                 tracking_credentials_file: Optional[str] = None, admin_token_file: Optional[str] = None):
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
        guards.GUARDS.max_body_bytes = int(max_body_bytes)
        serve_metrics.METRICS = serve_metrics.ServeMetrics(serve_metrics.api_paths(api))
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
        # --- online experiments: signed impression ids, durable impression/feedback logs, arms
        from bundlerec.experiments.event_log import OnlineLog
        from bundlerec.experiments.assignment import ImpressionSigner

        self.signer = ImpressionSigner(self.user_key or hashlib.sha256(f"bundlerec:{model_uri}".encode()).digest())
        self.log = OnlineLog(event_log_dir, event_flush_s) if event_log_dir else None
        # recent (impression, event) keys, as 16-byte digests (an impression id is up to 2 KB): idempotency
        # within this replica, 500,000 keys in about 70 MB (the full keys took about 420 MB)
        self._seen: "OrderedDict[bytes, None]" = OrderedDict()
        self._seen_lock = threading.Lock()
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

    def _remember(self, m: Loaded) -> None:
        if self.store is not None and m.info.version and m.local and m.info.uri.startswith("models:/"):
            self.store.remember(self.model_uri, m.info.name, m.info.version, m.local, m.digest)

    def _refuse(self, version: Optional[str], e: Exception) -> None:
        from datetime import datetime, timezone

        self.refused = {"version": version, "error": f"{type(e).__name__}: {e}"[:500],
                        "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        log.error("bundlerec: refused %s version %s, still serving version %s: %s", self.model_uri, version,
                  getattr(getattr(self, "current", None), "info", None) and self.current.info.version, e)

    def _watch(self, poll_s: float) -> None:
        """Follow the alias and the experiment tag every ``poll_s``; an unexpected error is logged and
        the next round runs (the thread never ends before the replica does; /readyz says if it did)."""
        while not self._stop.wait(poll_s):
            try:
                if "@" in self.model_uri:
                    self._follow_alias()
                self._sync_experiment()
                self.watch_error = None
            except Exception as e:
                self.watch_error = f"{type(e).__name__}: {e}"[:500]
                log.exception("bundlerec: registry watch round failed (next round in %.0fs)", poll_s)

    def _follow_alias(self) -> None:
        """Follow the alias: load and check a moved champion beside the old one, then swap the
        reference. A version that fails (manifest, load, canned request) is refused once and the
        old one keeps serving; it is retried only when the alias moves again."""
        try:
            _, version, _ = _resolve(self.model_uri, self.tracking_uri)
        except Exception as e:  # registry hiccup: keep serving the loaded model
            log.warning("bundlerec: alias check failed: %s", e)
            return
        if not version or version == self.current.info.version or (self.refused or {}).get("version") == version:
            return
        arms = {m.info.version: m for m in self.experiment.arms.values()} if self.experiment is not None else {}
        if version in arms:  # promoted from an experiment: that arm's model is loaded and checked already
            a = arms[version]
            new = Loaded(a.rec, a.info.model_copy(update={"alias": self.model_uri.rsplit("@", 1)[-1],
                                                            "uri": f"models:/{self.model_name}/{version}"}),
                         a.source, a.local, a.digest)
        else:
            try:
                new = load(self.model_uri, self.tracking_uri, self.ann, self.user_key, self.store)
            except Exception as e:
                self._refuse(version, e)
                return
        self.current = new  # atomic: requests in flight keep the object they hold
        self.refused = None
        self.reloads += 1
        self._remember(new)
        log.info("bundlerec: reloaded %s -> version %s", self.model_uri, new.info.version)

    def _sync_experiment(self) -> None:
        """Follow the registry's experiment tag: load and check every arm's version (reusing loaded
        ones) beside what serves, then swap the experiment in one assignment. An experiment whose
        arms fail to load is refused (``GET /v1/experiment`` says why) and traffic stays as it was."""
        import json

        import mlflow

        from bundlerec.experiments import lifecycle
        from bundlerec.experiments.assignment import Experiment
        from bundlerec.tracking import one_try

        try:
            client = mlflow.MlflowClient(self.tracking_uri)
            with one_try(10):
                spec = lifecycle.read(client, self.model_name)
                versions = {a: lifecycle.resolve(client, self.model_name, arm["model"])
                            for a, arm in (spec or {}).get("arms", {}).items()}
        except lifecycle.ExperimentSpecError as e:  # a malformed tag: refused, traffic as it was
            if (self.experiment_refused or {}).get("error") != str(e):
                log.error("bundlerec: experiment tag refused: %s", e)
            self.experiment_refused = {"name": None, "key": None, "error": str(e)[:500]}
            return
        except Exception as e:  # registry hiccup: keep the traffic split as it is
            log.warning("bundlerec: experiment check failed: %s", e)
            return
        malformed_before = self.experiment_refused is not None and self.experiment_refused["key"] is None
        if malformed_before:  # the malformed tag was put right (or removed)
            self.experiment_refused = None
        if spec is None:
            if self.experiment is not None:
                log.info("bundlerec: experiment %s ended; all traffic to %s", self.experiment.name, self.model_uri)
            self.experiment, self._experiment_key = None, None
            return
        key = json.dumps([spec, versions], sort_keys=True)
        if key in (self._experiment_key, (self.experiment_refused or {}).get("key")):
            return
        pool = {self.current.info.version: self.current}
        if self.experiment is not None:
            pool.update({m.info.version: m for m in self.experiment.arms.values()})
        arms = {}
        try:
            for arm, version in sorted(versions.items()):
                if version not in pool:
                    pool[version] = load(f"models:/{self.model_name}/{version}", self.tracking_uri, self.ann,
                                         self.user_key, self.store)
                arms[arm] = pool[version]
        except Exception as e:
            self.experiment_refused = {"name": spec.get("name"), "key": key, "error": f"{type(e).__name__}: {e}"[:500]}
            log.error("bundlerec: experiment %s refused (arm %s, version %s): %s", spec.get("name"), arm, version, e)
            return
        spec = {**spec, "arms": {a: {**spec["arms"][a], "version": versions[a]} for a in spec["arms"]}}
        self.experiment = Experiment(spec, arms)  # atomic: a request routes on the object it read
        self._experiment_key, self.experiment_refused = key, None
        log.info("bundlerec: experiment %s running: %s", spec["name"], {a: versions[a] for a in sorted(arms)})

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

    def _impression(self, m: Loaded, exp: Optional[str], arm: Optional[str], unit: str, new_session: Optional[str],
                    endpoint: str, items: list, bundles: list) -> dict:
        """Issue the answer's impression id and log what was shown (before the answer goes out)."""
        shown = [items] if endpoint == "recommendations" else [[i["item_id"] for i in b["items"]] for b in bundles]
        iid, f = self.signer.issue(unit, exp, arm, m.info.version, endpoint, shown)
        if self.log is not None:
            self._log_impression([{
                "impression_id": iid, "event_time": f["t"], "experiment": exp, "arm": arm, "model_name": m.info.name,
                "model_version": m.info.version, "endpoint": endpoint, "user_id": unit, "session_id": new_session,
                "items": items, "bundle_items": [[i["item_id"] for i in b["items"]] for b in bundles],
                "bundle_list_prices": [b.get("list_price") for b in bundles],
                "bundle_prices": [b.get("bundle_price") for b in bundles]}])
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
                      limits=req.limits())
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
        import hashlib
        import time as _time

        from bundlerec.experiments.assignment import bound_feedback

        if self.log is None:
            raise HTTPException(503, "feedback is not recorded by this deployment (serve.event_log_dir is empty)")
        rec, now = self.current.rec, int(_time.time() * 1e6)
        rows, keys, dup = [], set(), 0
        for i, e in enumerate(req.events):
            try:
                imp = self.signer.check(e.impression_id)
            except ValueError as err:
                raise RequestValidationError([{"loc": ("body", "events", i, "impression_id"), "msg": str(err),
                                               "type": "value_error"}]) from None
            items = e.items if e.type == "bundle_accept" else [e.item_id]
            unknown = [x for x in items if x not in rec.item_pos]
            if unknown:
                field = "items" if e.type == "bundle_accept" else "item_id"
                raise RequestValidationError([{"loc": ("body", "events", i, field), "type": "value_error",
                                               "msg": f"not in the catalog: {unknown[:5]}"}])
            wrong = bound_feedback(self.signer, imp, e, [float(rec.prices[rec.item_pos[x]]) for x in items], now)
            if wrong:  # feedback must match what the answer showed (items, endpoint, bundle, time, price)
                raise RequestValidationError([{"loc": ("body", "events", i, wrong[0]), "type": "value_error",
                                               "msg": wrong[1]}])
            key = hashlib.blake2b(f"{e.impression_id}|{e.event_id}".encode(), digest_size=16).digest()
            with self._seen_lock:
                seen = key in self._seen or key in keys
            if seen:
                dup += 1
                continue
            keys.add(key)
            list_prices = [max(rec.prices[rec.item_pos[x]], 0.0) for x in items]
            if e.type == "bundle_accept":  # the bundle price split over its items in proportion to list price
                total = sum(list_prices)
                paid = [e.price * (p / total if total > 0 else 1 / len(items)) for p in list_prices]
            else:
                paid = [e.price if e.price is not None else list_prices[0]]
            t = int(e.event_time.timestamp() * 1e6) if e.event_time else now
            for x, p in zip(items, paid):
                rows.append({"event_time": t, "event_type": FEEDBACK_EVENT_TYPE[e.type], "user_id": imp["u"],
                             "session_id": imp["u"] if imp["u"].startswith("anon-") else None, "item_id": x,
                             "price": round(p, 4), "quantity": e.quantity, "impression_id": e.impression_id,
                             "event_id": e.event_id, "feedback_type": e.type, "experiment": imp["e"], "arm": imp["a"],
                             "model_version": imp["v"], "bundle_index": e.bundle_index,
                             "revenue": round(p * e.quantity, 4) if FEEDBACK_EVENT_TYPE[e.type] == "purchase" else 0.0,
                             "received_time": now})
        from bundlerec.experiments.event_log import LogUnavailable

        try:
            self.log.feedback.append(rows)  # durable (write-ahead) before the answer
        except LogUnavailable as e:  # nothing recorded: the client sends it again later
            raise HTTPException(503, f"feedback not recorded, retry later: {e}", headers={"Retry-After": "5"}) from None
        with self._seen_lock:
            for k in keys:
                self._seen[k] = None
            while len(self._seen) > 500_000:
                self._seen.popitem(last=False)
        return FeedbackResponse(accepted=len(keys), duplicates=dup)

    @api.get("/v1/experiment", dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)
    def experiment_state(self) -> dict:
        """The experiment this replica runs (registry spec with each arm's version), or none, and
        the last one it refused."""
        exp = self.experiment
        return {"experiment": exp.spec if exp else None, "refused": self.experiment_refused,
                "impressions_logged": self.log is not None}

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

    @api.get("/v1/explore/users", response_model=UserSample, dependencies=[Depends(require_admin)],
             responses=ERROR_RESPONSES)
    def explore_users(self, n: int = Query(10, ge=1, le=50)) -> UserSample:
        """Sample shoppers of the model's data snapshot (the explorer's picker)."""
        return UserSample(users=self.current.rec.sample_users(n))

    @api.post("/v1/explore/history", response_model=HistoryResponse, dependencies=[Depends(require_admin)],
              responses=ERROR_RESPONSES)
    def explore_history(self, req: HistoryRequest) -> HistoryResponse:
        """The history the model reads for a user (what recommendations and bundles start from)."""
        m = self.current
        h = m.rec.history_for_user(req.user_id)
        return HistoryResponse(events=m.rec.describe_history(h), history_source=h.source, model=m.info)

    @api.get("/v1/explore/items", response_model=ItemSearchResponse, dependencies=[Depends(require_admin)],
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
        return {**m.info.model_dump(), "n_items": len(m.rec.item_ids), "history_len": m.rec.history_len,
                "reloads": self.reloads, "source": m.source, "refused": self.refused,
                "event_log": self.log.health() if self.log is not None else None,
                "base_model": m.rec.meta.get("base_model"),
                "pricing": m.rec.bundle_engine.pricing_info if m.rec.bundle_engine else None,
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
