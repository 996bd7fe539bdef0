"""Ray Serve application: the registered champion answers recommendations over HTTP.

    serve run serve/config.yaml                     # foreground, local
    serve deploy serve/config.yaml                  # to the running cluster (same as python -m jobs.deploy)
    curl -s -X POST http://127.0.0.1:8000/v1/recommendations -H 'content-type: application/json' \
         -d '{"user_id": "U0000007", "k": 5}'

The model is loaded once per replica (MLflow registry alias, version or a local export dir), the
item index is precomputed at export time, and requests are micro-batched with ``@serve.batch``.
A background thread polls the alias; when it moves, the new version is loaded beside the old one and
swapped in atomically, so in-flight requests finish on the model they started with.

Guards: bearer-token authentication (``auth: true`` + ``auth_token_file`` or $BUNDLEREC_API_TOKENS;
401 without a token, 403 with a wrong one; /healthz and /readyz stay open for probes), a request-body
limit (413), pydantic bounds on k/n/bundle size/history length (422), and overload answered by Serve
itself with 503 + Retry-After once ``max_queued_requests`` is reached (serve/config.yaml).
"""


import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve

from bundlerec.api import ERROR_RESPONSES, BundleRequest, BundleResponse, ModelInfo, RecommendationRequest, RecommendationResponse
from bundlerec import auth as guards
from bundlerec.auth import TokenAuth

log = logging.getLogger("ray.serve")

api = FastAPI(title="bundlerec", version="0.1.0",
              description="Personalized recommendations from the bundlerec champion model.")


MAX_BODY_BYTES = 256 * 1024
_bearer = HTTPBearer(auto_error=False, description="API token (serve args auth_token_file / $BUNDLEREC_API_TOKENS)")


def require_token(request: Request, cred: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> None:
    """401 without a bearer token, 403 with a wrong one; a no-op when authentication is off."""
    auth: Optional[TokenAuth] = guards.GUARDS.auth  # set per replica in Recommender.__init__
    if auth is None:
        return
    err = auth.check(request.headers.get("authorization"))
    if err:
        raise HTTPException(err[0], err[1], headers={"WWW-Authenticate": "Bearer"} if err[0] == 401 else None)


@api.middleware("http")
async def limit_body(request: Request, call_next):
    """413 for bodies above the limit (declared or actual), before any parsing."""
    if request.method in ("POST", "PUT", "PATCH"):
        limit = guards.GUARDS.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
        if declared is None and len(await request.body()) > limit:
            return JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
    return await call_next(request)


@dataclass
class Loaded:
    rec: Any  # bundlerec.recommend.Recommender
    info: ModelInfo


def _resolve(model_uri: str, tracking_uri: Optional[str]) -> tuple[str, Optional[str], Optional[str]]:
    """models:/name@alias -> (models:/name/<version>, version, alias); other URIs unchanged."""
    if not model_uri.startswith("models:/"):
        return model_uri, None, None
    import mlflow

    name, _, ref = model_uri[len("models:/"):].partition("@")
    if ref:
        mv = mlflow.MlflowClient(tracking_uri).get_model_version_by_alias(name, ref)
        return f"models:/{name}/{mv.version}", str(mv.version), ref
    name, _, version = model_uri[len("models:/"):].partition("/")
    return model_uri, version or None, None


def load(model_uri: str, tracking_uri: Optional[str], ann: Optional[dict] = None) -> Loaded:
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    uri, version, alias = _resolve(model_uri, tracking_uri)
    if uri.startswith("models:/") or uri.startswith("runs:/"):
        import mlflow

        rec = mlflow.pyfunc.load_model(uri).unwrap_python_model().rec
        name = uri[len("models:/"):].split("/")[0] if uri.startswith("models:/") else "bundlerec"
    else:
        from bundlerec.recommend import Recommender

        rec, name = Recommender.from_export(uri), os.path.basename(os.path.normpath(uri))
    rec.configure_ann(**(ann or {}))  # approximate top-k for large catalogs (bundlerec.ann)
    return Loaded(rec, ModelInfo(name=name, version=version, alias=alias, uri=uri))


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress(api)
class Recommender:
    def __init__(self, model_uri: str, tracking_uri: Optional[str] = None, poll_s: float = 10.0,
                 torch_threads: int = 1, auth: bool = False, auth_token_file: Optional[str] = None,
                 max_body_bytes: int = MAX_BODY_BYTES, ann_min_items: int = 50_000, ann_nprobe: int = 48):
        import torch

        torch.set_num_threads(torch_threads)
        # auth=True with no token configured fails the replica at start (a clear deploy error, never an open door)
        if auth or auth_token_file or os.environ.get("BUNDLEREC_API_TOKENS"):
            guards.GUARDS.auth = TokenAuth(auth_token_file)
            log.info("bundlerec: bearer-token authentication on (%d token(s))", len(guards.GUARDS.auth))
        else:
            guards.GUARDS.auth = None
            log.warning("bundlerec: authentication is OFF (set serve args auth: true and a token)")
        guards.GUARDS.max_body_bytes = int(max_body_bytes)
        self.model_uri, self.tracking_uri = model_uri, tracking_uri
        self.ann = {"min_items": ann_min_items, "nprobe": ann_nprobe, "threads": torch_threads}
        self.current: Loaded = load(model_uri, tracking_uri, self.ann)
        self.reloads = 0
        self._stop = threading.Event()
        if poll_s > 0 and "@" in model_uri:
            threading.Thread(target=self._watch, args=(poll_s,), daemon=True).start()

    def _watch(self, poll_s: float) -> None:
        """Follow the alias: load a moved champion beside the old one, then swap the reference."""
        while not self._stop.wait(poll_s):
            try:
                _, version, _ = _resolve(self.model_uri, self.tracking_uri)
                if version and version != self.current.info.version:
                    new = load(self.model_uri, self.tracking_uri, self.ann)
                    self.current = new  # atomic: requests in flight keep the object they hold
                    self.reloads += 1
                    log.info("bundlerec: reloaded %s -> version %s", self.model_uri, new.info.version)
            except Exception as e:  # registry hiccup: keep serving the loaded model
                log.warning("bundlerec: alias check failed: %s", e)

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
    def bundles(self, req: BundleRequest) -> BundleResponse:
        """Personalized bundles with optimized prices (runs in FastAPI's thread pool)."""
        m = self.current
        if req.events is not None:
            h = m.rec.history_from_events([e.model_dump() for e in req.events])
        else:
            h = m.rec.history_for_user(req.user_id)
        out = m.rec.bundles(h, n=req.n, max_size=req.max_size, budget=req.budget, allow_repeats=req.allow_repeats)
        return BundleResponse(bundles=out, cold_start=not h.items, unknown_items=h.unknown_items,
                              history_source=h.source, model=m.info)

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", responses={503: ERROR_RESPONSES[503]})
    def readyz(self) -> dict:
        if self.current is None:
            raise HTTPException(503, "model not loaded")
        info = self.current.info  # open endpoint (probes): name/version only, no paths
        return {"status": "ready", "model": {"name": info.name, "version": info.version, "alias": info.alias}}

    @api.get("/v1/model", dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)
    def model(self) -> dict:
        m = self.current
        return {**m.info.model_dump(), "n_items": len(m.rec.item_ids), "history_len": m.rec.history_len,
                "reloads": self.reloads, "base_model": m.rec.meta.get("base_model")}


def build_app(args: dict) -> serve.Application:
    """Application builder for serve/config.yaml (``import_path: serve.app:build_app``)."""
    return Recommender.bind(model_uri=args["model_uri"], tracking_uri=args.get("tracking_uri"),
                            poll_s=float(args.get("poll_s", 10.0)), torch_threads=int(args.get("torch_threads", 1)),
                            auth=bool(args.get("auth", False)), auth_token_file=args.get("auth_token_file"),
                            max_body_bytes=int(args.get("max_body_bytes", MAX_BODY_BYTES)),
                            ann_min_items=int(args.get("ann_min_items", 50_000)),
                            ann_nprobe=int(args.get("ann_nprobe", 48)))
