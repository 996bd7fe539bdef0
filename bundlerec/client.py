"""The endpoint's JSON-over-HTTP client: one call, used by the demo, deploy's readiness wait, the
experiment lifecycle and the tests."""

from __future__ import annotations

import json
import urllib.request
from typing import Optional


def http_json(url: str, body: Optional[dict] = None, timeout: float = 30.0, token: Optional[str] = None) -> dict:
    """GET (no ``body``) or POST ``body`` as JSON to ``url``, with a bearer ``token``; the decoded answer.
    HTTP errors raise :class:`urllib.error.HTTPError`."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())
