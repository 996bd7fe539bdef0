"""Request guards of the Serve endpoint: bearer-token check (a FastAPI dependency) and body limit.

The settings live in :data:`GUARDS`, a module-level object of this importable module. Ray Serve ships
the deployment class by value (cloudpickle), so an object imported *by name* into the deployment's
module arrives in the replica as a pickled copy; the deployment must set ``guards.GUARDS.…`` through
the module (modules pickle by reference), which is what the FastAPI dependencies below read.

    401 -- no ``Authorization: Bearer …`` header (with ``WWW-Authenticate: Bearer``)
    403 -- a token that is not one of the configured ones
    405 -- a body sent to a route outside ``/v1/`` (none of them takes one): answered unread
    408 -- a body that has not arrived within ``body_timeout_s``
    413 -- a body above ``max_body_bytes`` (declared, or counted while it streams in: reading stops there)
    422 -- invalid input, rendered safely whatever it holds (:func:`validation_error`)
    429 -- a token over its rate limit in this replica (``rate_limit_rps``; ``Retry-After`` says when),
           checked right after the token, before any body is read
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

from fastapi import Depends, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bundlerec.config import ServeConfig
from bundlerec.serving.auth import TokenAuth


class RateLimiter:
    """A token bucket per API token: ``rate`` requests per second on average, up to ``burst`` at once.
    Memory is bounded: beyond ``max_keys`` tokens the least recently seen bucket is dropped (it comes
    back full, which only errs towards admitting)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate, self.burst, self.max_keys, self.clock = float(rate), int(burst), int(max_keys), clock
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)
        self._lock = threading.Lock()

    def admit(self, key: bytes) -> float:
        """0.0 when the request may go ahead (one token spent), else the seconds until one is there."""
        now = self.clock()
        with self._lock:
            tokens, when = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0 if wait == 0.0 else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return wait


class EndpointGuards:
    """Per-process guard settings, set by each replica at start."""

    def __init__(self) -> None:
        self.auth: Optional[TokenAuth] = None
        self.admin: Optional[TokenAuth] = None  # explore/admin tokens; None = the API tokens serve those routes too
        self.max_body_bytes: int = ServeConfig.max_body_bytes
        self.body_timeout_s: float = 10.0  # the whole body, from the first byte the middleware asks for
        self.limiter: Optional[RateLimiter] = None  # per token, per replica (serve rate_limit_rps; None = none)
        self.edge = None  # bundlerec.serving.edge.EdgePublisher of a Serve replica: told the route prefix


GUARDS = EndpointGuards()

_bearer = HTTPBearer(auto_error=False, description="API token (serve args auth_token_file / $BUNDLEREC_API_TOKENS)")


ADMIN_PREFIX = "/v1/explore/"  # the routes that read any shopper's history: admin tokens when configured


def _auth_for(path: str) -> Optional[TokenAuth]:
    """The token set a path is checked against: the admin tokens for :data:`ADMIN_PREFIX` routes when
    the deployment has them (``admin_token_file``), else the API tokens."""
    return GUARDS.admin if GUARDS.admin is not None and path.startswith(ADMIN_PREFIX) else GUARDS.auth


def _over_limit(authorization: Optional[str]) -> Optional[float]:
    """Seconds to wait when this (already verified) token is over its rate limit, else None."""
    if GUARDS.limiter is None or not authorization:
        return None
    wait = GUARDS.limiter.admit(hashlib.sha256(authorization.encode("utf-8", "surrogatepass")).digest())
    return wait or None


def _retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


def _check(auth: Optional[TokenAuth], request: Request) -> None:
    if auth is None:
        return
    err = auth.check(request.headers.get("authorization"))
    if err:
        raise HTTPException(err[0], err[1], headers={"WWW-Authenticate": "Bearer"} if err[0] == 401 else None)
    if request.method not in ("POST", "PUT", "PATCH"):  # bodies: limit_body has counted the request already
        wait = _over_limit(request.headers.get("authorization"))
        if wait:
            raise HTTPException(429, "rate limit of this token exceeded", headers={"Retry-After": _retry_after(wait)})


def require_token(request: Request, cred: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> None:
    """401 without a bearer token, 403 with a wrong one; a no-op when authentication is off."""
    _check(GUARDS.auth, request)


def require_admin(request: Request, cred: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> None:
    """The explore routes (any shopper's history): an admin token where the deployment has an admin
    token file (an API token is then 403 there), else an API token."""
    _check(GUARDS.admin if GUARDS.admin is not None else GUARDS.auth, request)


MAX_JSON_DEPTH = 32  # the deepest request schema nests 4 levels


class _BadJSON(ValueError):
    pass


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _BadJSON("a JSON object repeats a key")
    return dict(pairs)


def _json_depth(text: str) -> int:
    """Deepest nesting of [ and { outside strings (checked before parsing: the parser recurses)."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _error(status: int, detail: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def limit_body(request: Request, call_next):
    """HTTP middleware for request bodies, before any parsing, in this order: authentication of the
    /v1 routes (401/403 without reading the body), 415 for a body that is not application/json,
    413 above the size limit (declared or actual), 400 for a body that is not UTF-8, nested deeper
    than MAX_JSON_DEPTH, or repeats a key in an object. Error bodies never echo the input."""
    if GUARDS.edge is not None:
        GUARDS.edge.saw(request.scope.get("root_path", ""))
    if request.method in ("POST", "PUT", "PATCH"):
        path, root = request.scope["path"], request.scope.get("root_path", "")
        if root and path.startswith(root):  # deployed under a route prefix: the app's own path
            path = path[len(root):]
        if not path.startswith("/v1/"):  # no route outside /v1/ takes a body: not a byte is read
            return _error(405, "this route takes no request body", {"Connection": "close"})
        auth = _auth_for(path)
        if auth is not None:
            err = auth.check(request.headers.get("authorization"))
            if err:
                return _error(err[0], err[1], {"WWW-Authenticate": "Bearer", "Connection": "close"} if err[0] == 401
                              else {"Connection": "close"})
            wait = _over_limit(request.headers.get("authorization"))
            if wait:  # before a byte of the body is read
                return _error(429, "rate limit of this token exceeded", {"Retry-After": _retry_after(wait), "Connection": "close"})
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return _error(415, "send the body as application/json")
        limit = GUARDS.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return _error(413, f"request body larger than {limit} bytes", {"Connection": "close"})
        try:
            body = await _read_capped(request, limit, GUARDS.body_timeout_s)
        except _TooLarge:
            return _error(413, f"request body larger than {limit} bytes", {"Connection": "close"})
        except asyncio.TimeoutError:
            return _error(408, f"request body not received within {GUARDS.body_timeout_s:g} s", {"Connection": "close"})
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, "request body is not valid UTF-8")
        if _json_depth(text) > MAX_JSON_DEPTH:
            return _error(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except _BadJSON as e:
            return _error(400, str(e))
        except ValueError:
            pass  # not JSON at all: FastAPI answers 422 json_invalid
    return await call_next(request)


class _TooLarge(Exception):
    pass


async def _read_capped(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, read chunk by chunk: stops at the first byte over ``limit`` (:class:`_TooLarge`) or
    when the whole body has not arrived within ``timeout_s`` (``asyncio.TimeoutError``); what was
    read is handed on to the route (Starlette replays ``request._body``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0.0))
        except StopAsyncIteration:
            break
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # what the route reads (BaseHTTPMiddleware's cached request)
    return body


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    """422 with the validation errors (type, location, message; not the offending input, which may be
    huge or personal), whatever the input held: FastAPI's default renderer fails
    (500) on a lone surrogate ("\\ud800") or a NaN in the echoed input; here non-finite numbers become
    strings and the JSON is ASCII (surrogates escaped)."""
    errors = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]  # never echo the input
    detail = _finite(jsonable_encoder(errors, custom_encoder={Exception: str}))
    return Response(json.dumps({"detail": detail}, ensure_ascii=True, allow_nan=False, default=str),
                    status_code=422, media_type="application/json")

