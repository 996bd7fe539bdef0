"""The hostile clients of ``bundlerec loadtest --slow-bodies`` against a real uvicorn server running
the Serve app's own body and token guards (no Ray): every hostile connection gets its answer
without sending its body (405 on an open route, 401 / 403 on a token route without a token or with
a wrong one), connects again, and the
authenticated requests measured beside them are all answered. And the Serve proxy's guard
(:class:`bundlerec.serving.edge.EdgeGuard`) in front of such an app: it answers those requests
itself, so none of them reaches the app behind it."""

import threading
import time

import pytest
import uvicorn
from fastapi import Depends, FastAPI

from bundlerec.serving import guards
from bundlerec.serving.auth import TokenAuth, write_token_file
from bundlerec.serving.hostile import SlowBodies, slow_bodies_level
from bundlerec.serving.schemas import RecommendationRequest
from tests.support import free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "api_token")
    token = write_token_file(path)
    saved = guards.GUARDS.auth
    guards.GUARDS.auth = TokenAuth(path)
    app = FastAPI()
    app.middleware("http")(guards.limit_body)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/recommendations", dependencies=[Depends(guards.require_token)])
    def recommend(req: RecommendationRequest):
        return {"items": []}

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", token
    srv.should_exit = True
    t.join(10)
    guards.GUARDS.auth = saved


@pytest.mark.parametrize("kind", ["trickle", "chunked"])
def test_slow_bodies_are_answered_without_their_bodies_and_come_back(server, kind):
    url, token = server
    with SlowBodies(url, 20, kind, interval_s=0.1) as hostile:
        time.sleep(1.5)
        seen = hostile.stats()
    assert seen["opened"] > 20, seen  # answered, then connected again at the next tick
    assert set(seen["answers"]) == {"401", "403", "405"}, seen
    assert seen["body_bytes_sent"] < 20 * 15 * 1100, seen  # a piece per tick at most


def test_the_level_measures_authenticated_requests_alone_and_beside_them(server):
    url, token = server
    res = slow_bodies_level(url, ["u1", "u2"], 2, 40, 3, token, 10, settle_s=0.5)
    assert res["alone"]["errors"] == 0 and res["with_slow_bodies"]["errors"] == 0, res
    assert res["with_slow_bodies"]["requests"] == 40 and res["slow_bodies"]["opened"] >= 10
    assert res["p99_ratio"] == pytest.approx(res["with_slow_bodies"]["p99_ms"] / res["alone"]["p99_ms"])
    with pytest.raises(ValueError, match="trickle"):
        SlowBodies(url, 1, "flood")


def test_the_proxys_guard_answers_hostile_requests_itself_and_forwards_the_rest(tmp_path, monkeypatch):
    """EdgeGuard with three apps' settings (as their replicas publish them) in front of a counting
    ASGI app, under uvicorn: token-less requests (401), wrong tokens (403) and bodies on open routes
    (405) never reach the app; tokened requests, GETs of open routes and other prefixes do,
    unchanged; where the replicas' environment adds tokens the proxy cannot see, a wrong token is
    forwarded for the replica to refuse."""
    import http.client

    from bundlerec.serving.edge import EdgeGuard, replica_settings

    path = str(tmp_path / "api_token")
    token = write_token_file(path)
    monkeypatch.delenv("BUNDLEREC_API_TOKENS", raising=False)
    settings = {"/shop": replica_settings(path, None, True), "/open": replica_settings(None, None, False)}
    monkeypatch.setenv("BUNDLEREC_API_TOKENS", "t" * 30)  # a replica with tokens from its environment
    settings["/env"] = replica_settings(path, None, True)
    monkeypatch.delenv("BUNDLEREC_API_TOKENS")
    for prefix, s in settings.items():
        s["prefix"] = prefix  # learnt from the first request each replica serves
    assert settings["/shop"]["verify"] and not settings["/env"]["verify"] and not settings["/open"]["auth"]
    reached = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        reached.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(EdgeGuard(app, settings), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        def ask(method, p, auth=None, body=None):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request(method, p, body, {"Authorization": auth} if auth else {})
            r = c.getresponse()
            return r.status, r.read()

        good, bad = f"Bearer {token}", "Bearer " + "x" * 43
        refused = [("POST", "/shop/healthz", None, 405), ("POST", "/shop/", good, 405), ("GET", "/shop/v1/model", None, 401),
                   ("POST", "/shop/v1/recommendations", "Basic abc", 401), ("POST", "/shop/v1/recommendations", bad, 403),
                   ("POST", "/open/healthz", None, 405), ("POST", "/env/v1/feedback", None, 401)]
        for method, p, auth, code in refused:
            status, body = ask(method, p, auth, b"{}" if method == "POST" else None)
            assert status == code and b"detail" in body, (method, p, status, body)
        assert reached == []
        forwarded = [("POST", "/shop/v1/recommendations", good), ("GET", "/shop/healthz", None),
                     ("POST", "/open/v1/recommendations", None), ("POST", "/env/v1/feedback", bad),
                     ("POST", "/elsewhere/anything", None)]
        for method, p, auth in forwarded:
            assert ask(method, p, auth, b"{}" if method == "POST" else None)[0] == 200, p
        assert reached == [(m, p) for m, p, _ in forwarded]
        write_token_file(path)  # rotated: the old token is refused at the edge, the new one passes
        assert ask("POST", "/shop/v1/recommendations", good, b"{}")[0] == 403
        with SlowBodies(f"http://127.0.0.1:{port}/shop", 20, "trickle", interval_s=0.1) as hostile:
            time.sleep(1.0)
            seen = hostile.stats()
        assert seen["opened"] > 20 and set(seen["answers"]) == {"405", "401", "403"}, seen
        assert len(reached) == len(forwarded)  # none of the hostile requests reached the app
    finally:
        srv.should_exit = True
        t.join(10)
