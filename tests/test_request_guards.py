"""Request validation of the Serve app's schemas through a real FastAPI app with the app's own 422
renderer (no Ray): input that FastAPI's default renderer cannot echo (lone surrogates, NaN) gets a
clean 422, never a 500."""

import pytest
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from bundlerec.serving import guards
from bundlerec.serving.guards import limit_body, validation_error
from bundlerec.serving.schemas import BundleRequest, CompletionRequest, RecommendationRequest


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    app.middleware("http")(limit_body)
    app.exception_handler(RequestValidationError)(validation_error)

    @app.post("/v1/r")
    def r(req: RecommendationRequest):
        return {"ok": True}

    @app.post("/v1/b")
    def b(req: BundleRequest):
        return {"query": req.query, "budget": req.budget}

    @app.post("/v1/c")
    def c(req: CompletionRequest):
        return {"n": len(req.items)}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("path,body", [
    ("/v1/r", '{"user_id": "\\ud800"}'),
    ("/v1/b", '{"query": "\\udfff kit"}'),
    ("/v1/c", '{"items": ["\\ud800"]}'),
    ("/v1/b", '{"user_id": "u", "budget": NaN}'),
    ("/v1/b", '{"user_id": "u", "budget": Infinity}'),
    ("/v1/b", '{"user_id": "u", "events": [], "query": "kit"}'),  # a query takes one history, not two
    ("/v1/r", '{"user_id": "u", "as_of": "2026-01-01T00:00:00Z"}'),  # as_of dates events only
    ("/v1/b", '{"events": [], "as_of": "9999-01-01T00:00:00Z"}'),
    ("/v1/b", '{"query": "   "}'),
    ("/v1/c", '{"items": []}'),
    ("/v1/c", '{"items": [""]}'),
    ("/v1/r", '{"user_id": "u", "k": true}'),  # a boolean is not a count
    ("/v1/r", '{"user_id": "u", "k": 5.0}'),
    ("/v1/r", '{"user_id": "u", "k": 1e400}'),
    ("/v1/r", '{"user_id": "u", "k": 99999999999999999999999999}'),
    ("/v1/b", '{"user_id": "u", "n": -3}'),
    ("/v1/r", '{"events": [{"item_id": "a", "event_type": "view", "event_time": "9999-12-31T23:59:59Z"}]}'),
    ("/v1/r", '{"events": [{"item_id": "a", "event_type": "view", "event_time": "0001-01-01T00:00:00Z"}]}'),
    ("/v1/r", '{"events": [{"item_id": "a", "event_type": "view", "event_time": 1e20}]}'),
    ("/v1/r", ""),
    ("/v1/r", "hello"),
    ("/v1/r", "null"),
    ("/v1/r", "[]"),
    ("/v1/r", '{"user_id": "' + "x" * 129 + '"}'),
    ("/v1/r", '{"user_id": "u", "surprise": 1}'),
    ("/v1/r", '{"user_id": "u\\u0000x"}'),  # control characters in an id (a NUL, a line break): never an id
    ("/v1/r", '{"user_id": "u\\nINFO forged log line"}'),
    ("/v1/r", '{"user_id": "   "}'),  # blank
    ("/v1/r", '{"events": [{"item_id": "\\t", "event_type": "view", "event_time": "2026-01-01T00:00:00Z"}]}'),
    ("/v1/c", '{"items": ["a\\u001bb"]}'),
    ("/v1/c", '{"items": ["a"], "user_id": "\\u007f"}'),
])
def test_bad_input_is_a_clean_422(client, path, body):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"]  # valid JSON with the reason
    assert all("input" not in e for e in r.json()["detail"]) and "x" * 20 not in r.text  # nothing echoed


def test_good_input_passes(client):
    assert client.post("/v1/b", json={"query": "a camping starter kit", "budget": 300}).json() == {
        "query": "a camping starter kit", "budget": 300.0}
    # a description together with a history (bundlerec.bundles.engine.intent_and_history)
    assert client.post("/v1/b", json={"user_id": "u", "query": "kit"}).status_code == 200
    assert client.post("/v1/c", json={"items": ["a", "b"]}).json() == {"n": 2}


@pytest.mark.parametrize("body,ctype,status", [
    (b'{"user_id": "\xff\xfe"}', "application/json", 400),   # not UTF-8
    (b'{"user_id": "\xff\xfe"}', "text/plain", 415),         # was a 500
    (b'{"user_id": "u"}', "text/plain", 415),
    (b'{"user_id": "u"}', "", 415),
    (b'{"user_id": "a", "user_id": "b"}', "application/json", 400),  # which one did the client mean?
    (("[" * 5000 + "]" * 5000).encode(), "application/json", 400),
    (('{"user_id": ' + "[" * 100000 + "]" * 100000 + "}").encode(), "application/json", 400),
    (b'{"user_id": "u"}', "application/json; charset=utf-8", 200),
])
def test_malformed_bodies_are_4xx_and_echo_nothing(client, body, ctype, status):
    r = client.post("/v1/r", content=body, headers={"content-type": ctype} if ctype else {})
    assert r.status_code == status, r.text
    if status != 200:
        assert r.json()["detail"] and "\\xff" not in r.text and "[[[" not in r.text


def test_unauthenticated_requests_are_answered_before_the_body_is_read(client, monkeypatch):
    from bundlerec.serving.auth import TokenAuth

    monkeypatch.setenv("BUNDLEREC_API_TOKENS", "s3cret-token-of-enough-length")
    app = FastAPI()
    app.middleware("http")(limit_body)

    @app.post("/v1/r")
    def r(req: RecommendationRequest):
        return {"ok": True}

    monkeypatch.setattr(guards.GUARDS, "auth", TokenAuth())
    c = TestClient(app, raise_server_exceptions=False)
    huge = b"[" * 1_000_000  # neither the size nor the content is looked at without a token
    assert c.post("/v1/r", content=huge, headers={"content-type": "application/json"}).status_code == 401
    bad = {"content-type": "application/json", "authorization": "Bearer wrong"}
    assert c.post("/v1/r", content=huge, headers=bad).status_code == 403
    ok = {"content-type": "application/json", "authorization": "Bearer s3cret-token-of-enough-length"}
    assert c.post("/v1/r", content=huge, headers=ok).status_code == 413
    assert c.post("/v1/r", content=b'{"user_id": "u"}', headers=ok).json() == {"ok": True}


def test_a_token_over_its_rate_limit_gets_429_before_its_body_is_read(monkeypatch):
    """serve rate_limit_rps: a token bucket per token in the replica; beyond the burst a request is
    answered 429 with Retry-After (POST: before the body is read; GET: in the token dependency);
    another token keeps its own budget; it refills at the rate; memory is bounded by max_keys."""
    from bundlerec.serving.auth import TokenAuth
    from bundlerec.serving.guards import RateLimiter, require_token

    now = [0.0]
    lim = RateLimiter(rate=2.0, burst=3, max_keys=2, clock=lambda: now[0])
    assert [lim.admit(b"a") for _ in range(3)] == [0.0, 0.0, 0.0] and lim.admit(b"a") == pytest.approx(0.5)
    now[0] += 0.5  # one token back
    assert lim.admit(b"a") == 0.0 and lim.admit(b"a") > 0
    assert lim.admit(b"b") == 0.0 and lim.admit(b"c") == 0.0 and len(lim._buckets) == 2  # "a" dropped (oldest)
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)

    tokens = "first-token-of-enough-length,second-token-of-enough-length"
    monkeypatch.setenv("BUNDLEREC_API_TOKENS", tokens)
    monkeypatch.setattr(guards.GUARDS, "auth", TokenAuth())
    monkeypatch.setattr(guards.GUARDS, "limiter", RateLimiter(rate=0.01, burst=2))
    app = FastAPI()
    app.middleware("http")(limit_body)

    @app.post("/v1/r")
    def r(req: RecommendationRequest):
        return {"ok": True}

    @app.get("/v1/model", dependencies=[Depends(require_token)])
    def model():
        return {"ok": True}

    def hdr(t):
        return {"content-type": "application/json", "authorization": f"Bearer {t}"}

    c = TestClient(app, raise_server_exceptions=False)
    first, second = "first-token-of-enough-length", "second-token-of-enough-length"
    assert [c.post("/v1/r", content=b'{"user_id": "u"}', headers=hdr(first)).status_code for _ in range(2)] == [200, 200]
    over = c.post("/v1/r", content=b"[" * 1_000_000, headers=hdr(first))  # neither size nor content looked at
    assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
    assert c.get("/v1/model", headers=hdr(first)).status_code == 429
    assert c.get("/v1/model", headers=hdr(second)).status_code == 200  # its own bucket
    assert c.post("/v1/r", content=b'{"user_id": "u"}', headers=hdr("wrong-token")).status_code == 403  # not counted


def test_the_explore_routes_take_admin_tokens_where_the_deployment_has_them(monkeypatch):
    """/v1/explore/* reads any shopper's history: with an admin token file its tokens open those
    routes and nothing else, and an API token is 403 there; without one the API tokens open them."""
    from bundlerec.serving.app import api
    from bundlerec.serving.auth import TokenAuth
    from bundlerec.serving.guards import require_admin, require_token

    monkeypatch.setenv("BUNDLEREC_API_TOKENS", "api-token-of-enough-length-1")
    monkeypatch.setenv("BUNDLEREC_ADMIN_TOKENS", "admin-token-of-enough-length")
    app = FastAPI()
    app.middleware("http")(limit_body)

    @app.post("/v1/r", dependencies=[Depends(require_token)])
    def r(req: RecommendationRequest):
        return {"ok": True}

    @app.post("/v1/explore/history", dependencies=[Depends(require_admin)])
    def history(req: RecommendationRequest):
        return {"ok": True}

    c = TestClient(app, raise_server_exceptions=False)
    body = {"user_id": "u"}
    use = lambda t: {"authorization": f"Bearer {t}"}  # noqa: E731
    monkeypatch.setattr(guards.GUARDS, "auth", TokenAuth())
    monkeypatch.setattr(guards.GUARDS, "admin", None)  # no admin tokens: the API tokens open everything
    assert c.post("/v1/explore/history", json=body, headers=use("api-token-of-enough-length-1")).status_code == 200
    monkeypatch.setattr(guards.GUARDS, "admin", TokenAuth(env_var="BUNDLEREC_ADMIN_TOKENS"))
    assert c.post("/v1/explore/history", json=body, headers=use("api-token-of-enough-length-1")).status_code == 403
    assert c.post("/v1/explore/history", json=body, headers=use("admin-token-of-enough-length")).status_code == 200
    assert c.post("/v1/r", json=body, headers=use("admin-token-of-enough-length")).status_code == 403
    assert c.post("/v1/r", json=body, headers=use("api-token-of-enough-length-1")).status_code == 200
    # the service's own routes (Serve's ingress includes them as a router): every /v1/explore/ route,
    # and only those, on the admin dependency
    routes, todo = [], list(api.routes)
    while todo:
        rt = todo.pop()
        if hasattr(rt, "dependant"):
            routes.append(rt)
        todo.extend(getattr(rt, "routes", None) or getattr(getattr(rt, "original_router", None), "routes", None) or [])
    explore = [rt for rt in routes if rt.path.startswith("/v1/explore/")]
    assert len(explore) == 3 and len([rt for rt in routes if rt.path.startswith("/v1/")]) >= 8
    for rt in routes:
        deps = {d.call for d in rt.dependant.dependencies}
        if rt in explore:
            assert require_admin in deps and require_token not in deps, rt.path
        elif rt.path.startswith("/v1/"):
            assert require_admin not in deps and require_token in deps, rt.path


def _asgi_post(app, path: str, chunks: list, delay_s: float = 0.0, headers: tuple = ()) -> tuple:
    """POST a chunked body straight into the ASGI app (the way uvicorn hands it over, chunk by chunk)
    and count the chunks the app pulled: (status, chunks read)."""
    import asyncio

    pulled = 0

    async def receive():
        nonlocal pulled
        if pulled < len(chunks):
            if delay_s:
                await asyncio.sleep(delay_s)  # a client trickling its body
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        await asyncio.sleep(3600)  # the client neither sends more nor goes away
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked"), *headers],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), pulled


def test_bodies_are_streamed_with_a_cap_a_deadline_and_never_read_on_routes_that_take_none(monkeypatch):
    """No route outside /v1/ takes a body: a POST there is answered 405 with not one chunk read; a
    chunked body stops being read at the size limit (413); a trickled one gets 408 at the deadline;
    a body within both reaches the route whole."""
    import time

    app = FastAPI()
    app.middleware("http")(limit_body)

    @app.post("/v1/r")
    def r(req: RecommendationRequest):
        return {"ok": True}

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    chunk = b" " * 65536
    assert _asgi_post(app, "/healthz", [chunk] * 100) == (405, 0)
    assert _asgi_post(app, "/anything", [chunk] * 100) == (405, 0)
    status, pulled = _asgi_post(app, "/v1/r", [chunk] * 100)  # 6.4 MB, the limit is 256 KiB
    assert status == 413 and pulled == guards.GUARDS.max_body_bytes // len(chunk) + 1, pulled
    monkeypatch.setattr(guards.GUARDS, "body_timeout_s", 1.0)
    t = time.time()
    status, pulled = _asgi_post(app, "/v1/r", [b" "] * 100, delay_s=0.2)
    assert status == 408 and pulled <= 7 and time.time() - t < 5, (status, pulled)
    body = b'{"user_id": ' + b" " * 100_000 + b'"u"}'  # whole, in chunks, within both
    assert _asgi_post(app, "/v1/r", [body[i:i + 4096] for i in range(0, len(body), 4096)]) == (200, 25)
    # an app deployed under a route prefix (Serve's route_prefix: root_path) reads its own paths
    prefixed = FastAPI(root_path="/shop")
    prefixed.middleware("http")(limit_body)
    prefixed.post("/v1/r")(r)
    assert _asgi_post(prefixed, "/shop/v1/r", [b'{"user_id": "u"}']) == (200, 1)
    assert _asgi_post(prefixed, "/shop/healthz", [chunk]) == (405, 0)


def test_every_request_schema_carries_examples_that_validate():
    """Swagger's "Try it out" starts from the schema's examples: each one is a valid request (no 422)."""
    from bundlerec.serving import schemas
    from bundlerec.serving.app import api

    spec = api.openapi()["components"]["schemas"]
    for model in (schemas.RecommendationRequest, schemas.BundleRequest, schemas.CompletionRequest, schemas.HistoryRequest):
        examples = spec[model.__name__]["examples"]
        assert examples, model.__name__
        for example in examples:
            model.model_validate(example)  # raises on an example the endpoint would refuse


def test_the_metrics_route_labels_are_the_apps_own_paths():
    """Metrics label a request by the API's route (bundlerec.serving.metrics): the known paths, Serve's
    included routers too; anything else is "other", so a caller cannot create label values."""
    from bundlerec.serving.app import api
    from bundlerec.serving.metrics import api_paths

    paths = api_paths(api)
    assert {"/v1/recommendations", "/v1/bundles", "/v1/bundles/complete", "/v1/feedback", "/healthz"} <= paths
    assert not any("{" in p for p in paths)  # no templated path: a label per caller would be possible
