"""The bundle explorer page served at ``GET /`` (``explorer.html`` beside this module).

One self-contained HTML file: inline style and script, no external resource. The Content-Security-
Policy allows exactly that inline script and style (by their SHA-256) and requests to this origin,
so nothing else can run in the page even if an item title held markup (the page only sets text).
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib import resources


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
