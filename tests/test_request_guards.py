"""Request validation of the Serve app's schemas through a real FastAPI app with the app's own 422
renderer (no Ray): input that FastAPI's default renderer cannot echo (lone surrogates, NaN) gets a
clean 422, never a 500."""

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from bundlerec.serving.guards import validation_error
from bundlerec.serving.schemas import BundleRequest, CompletionRequest, RecommendationRequest


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    app.exception_handler(RequestValidationError)(validation_error)

    @app.post("/r")
    def r(req: RecommendationRequest):
        return {"ok": True}

    @app.post("/b")
    def b(req: BundleRequest):
        return {"query": req.query, "budget": req.budget}

    @app.post("/c")
    def c(req: CompletionRequest):
        return {"n": len(req.items)}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("path,body", [
    ("/r", '{"user_id": "\\ud800"}'),
    ("/b", '{"query": "\\udfff kit"}'),
    ("/c", '{"items": ["\\ud800"]}'),
    ("/b", '{"user_id": "u", "budget": NaN}'),
    ("/b", '{"user_id": "u", "budget": Infinity}'),
    ("/b", '{"user_id": "u", "query": "kit"}'),
    ("/b", '{"query": "   "}'),
    ("/c", '{"items": []}'),
    ("/c", '{"items": [""]}'),
])
def test_bad_input_is_a_clean_422(client, path, body):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"]  # valid JSON with the reason


def test_good_input_passes(client):
    assert client.post("/b", json={"query": "a camping starter kit", "budget": 300}).json() == {
        "query": "a camping starter kit", "budget": 300.0}
    assert client.post("/c", json={"items": ["a", "b"]}).json() == {"n": 2}
