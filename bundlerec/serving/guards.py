"""Request guards of the Serve endpoint: bearer-token check (a FastAPI dependency) and body limit.

The settings live in :data:`GUARDS`, a module-level object of this importable module. Ray Serve ships
the deployment class by value (cloudpickle), so an object imported *by name* into the deployment's
module arrives in the replica as a pickled copy; the deployment must set ``guards.GUARDS.…`` through
the module (modules pickle by reference), which is what the FastAPI dependencies below read.

    401 -- no ``Authorization: Bearer …`` header (with ``WWW-Authenticate: Bearer``)
    403 -- a token that is not one of the configured ones
    413 -- a body above ``max_body_bytes`` (declared or actual)
    422 -- invalid input, rendered safely whatever it holds (:func:`validation_error`)
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from fastapi import Depends, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bundlerec.config import ServeConfig
from bundlerec.serving.auth import TokenAuth


class EndpointGuards:
    """Per-process guard settings, set by each replica at start."""

    def __init__(self) -> None:
        self.auth: Optional[TokenAuth] = None
        self.max_body_bytes: int = ServeConfig.max_body_bytes


GUARDS = EndpointGuards()

_bearer = HTTPBearer(auto_error=False, description="API token (serve args auth_token_file / $BUNDLEREC_API_TOKENS)")


def require_token(request: Request, cred: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> None:
    """401 without a bearer token, 403 with a wrong one; a no-op when authentication is off."""
    auth = GUARDS.auth
    if auth is None:
        return
    err = auth.check(request.headers.get("authorization"))
    if err:
        raise HTTPException(err[0], err[1], headers={"WWW-Authenticate": "Bearer"} if err[0] == 401 else None)


async def limit_body(request: Request, call_next):
    """HTTP middleware: 413 for bodies above the limit (declared or actual), before any parsing."""
    if request.method in ("POST", "PUT", "PATCH"):
        limit = GUARDS.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
        if declared is None and len(await request.body()) > limit:
            return JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
    return await call_next(request)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    """422 with the validation errors, whatever the input held: FastAPI's default renderer fails
    (500) on a lone surrogate ("\\ud800") or a NaN in the echoed input; here non-finite numbers become
    strings and the JSON is ASCII (surrogates escaped)."""
    detail = _finite(jsonable_encoder(exc.errors(), custom_encoder={Exception: str}))
    return Response(json.dumps({"detail": detail}, ensure_ascii=True, allow_nan=False, default=str),
                    status_code=422, media_type="application/json")

