"""The bundle explorer page served at ``GET /`` (``explorer.html`` beside this module).

One self-contained HTML file: inline style and script, no external resource. The Content-Security-
Policy allows exactly that inline script and style (by their SHA-256) and requests to this origin,
so nothing else can run in the page even if an item title held markup (the page only sets text).
"""

import base64
import hashlib
import re
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse

from bundlerec.serving.guards import require_admin
from bundlerec.serving.schemas import (ERROR_RESPONSES, HistoryRequest, HistoryResponse, ItemSearchResponse,
                                       UserSample)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@lru_cache(maxsize=1)
def page() -> tuple[str, str]:
    """(html, Content-Security-Policy header)."""
    html = resources.files("bundlerec.serving").joinpath("explorer.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.S)
    csp = ("default-src 'none'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
           f"frame-ancestors 'none'; script-src {' '.join(map(_sha256, scripts))}; "
           f"style-src {' '.join(map(_sha256, styles))}")
    return html, csp


def _replica():
    """The Serve replica answering this request (the deployment object: its ``current`` model)."""
    from ray import serve

    return serve.get_replica_context().servable_object


router = APIRouter()
"""The page and the admin-token routes it calls (any shopper's history, the catalog): included in the
deployment's app (:mod:`bundlerec.serving.app`); each route reads the model the replica serves."""


@router.get("/", include_in_schema=False)
def explorer() -> HTMLResponse:
    """The bundle explorer: a static page (no external script, style or font) that calls the
    authenticated API below with the token typed into it (kept in the tab's sessionStorage)."""
    html, csp = page()
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                       "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})


@router.get("/v1/explore/users", response_model=UserSample, dependencies=[Depends(require_admin)],
            responses=ERROR_RESPONSES)
def explore_users(n: int = Query(10, ge=1, le=50), replica=Depends(_replica)) -> UserSample:
    """Sample shoppers of the model's data snapshot (the explorer's picker)."""
    return UserSample(users=replica.current.rec.sample_users(n))


@router.post("/v1/explore/history", response_model=HistoryResponse, dependencies=[Depends(require_admin)],
             responses=ERROR_RESPONSES)
def explore_history(req: HistoryRequest, replica=Depends(_replica)) -> HistoryResponse:
    """The history the model reads for a user (what recommendations and bundles start from)."""
    m = replica.current
    h = m.rec.history_for_user(req.user_id)
    return HistoryResponse(events=m.rec.describe_history(h), history_source=h.source, model=m.info)


@router.get("/v1/explore/items", response_model=ItemSearchResponse, dependencies=[Depends(require_admin)],
            responses=ERROR_RESPONSES)
def explore_items(q: str = Query("", max_length=100), limit: int = Query(10, ge=1, le=50),
                  replica=Depends(_replica)) -> ItemSearchResponse:
    """Catalog items whose id or title contains ``q`` (the explorer's cart)."""
    m = replica.current
    return ItemSearchResponse(items=m.rec.search_items(q, limit), model=m.info)
