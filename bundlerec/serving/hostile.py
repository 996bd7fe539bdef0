"""Hostile clients for the load test: many connections that send a request without a token and then
trickle its body, or stream a chunked body that never ends, to routes that take no body (``/healthz``)
or need a token (``/v1/recommendations``, without one or with a wrong one). What they cost the shoppers is measured by
``bundlerec loadtest --slow-bodies N`` (authenticated p99 alone and beside them, docs/benchmarks.md).

Each connection sends its headers, then one piece of body every ``interval_s``; when the server
answers (405 on a route that takes no body, 401 without a token, 403 with a wrong one, 408 past the
body deadline) or
closes, the client counts the answer and connects again at the next tick, so each connection sends
at most one new request per ``interval_s``. One thread
drives every connection with non-blocking sockets, so the load generator itself stays cheap.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from datetime import datetime, timezone
from urllib.parse import urlparse

# what each connection sends, in turn: a body to an open route, to a token route without a token, and
# with a token that is none of the endpoint's
TARGETS = (("/healthz", ""), ("/v1/recommendations", ""),
           ("/v1/recommendations", "Authorization: Bearer " + "x" * 43 + "\r\n"))


class SlowBodies:
    """``n`` hostile connections to ``url`` while the block runs (``with SlowBodies(...) as s``);
    ``s.stats()`` counts connections opened, answers by status and connections the server closed.

    Args:
        kind: ``"trickle"`` (a large Content-Length, one byte per tick) or ``"chunked"``
            (Transfer-Encoding: chunked, a 1 KiB chunk per tick, never a last chunk).
        interval_s: seconds between two pieces of one connection's body.
    """

    def __init__(self, url: str, n: int, kind: str = "trickle", interval_s: float = 0.5):
        if kind not in ("trickle", "chunked"):
            raise ValueError(f"kind must be 'trickle' or 'chunked', not {kind!r}")
        u = urlparse(url)
        self.addr, self.host, self.n, self.kind, self.interval_s = (u.hostname, u.port), u.netloc, n, kind, interval_s
        self.prefix = u.path.rstrip("/")  # an app under a route prefix
        self.opened, self.closed, self.answers, self.bytes_sent = 0, 0, {}, 0
        self._stop, self._thread = threading.Event(), threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()
        self._again: list[int] = []  # connections to open again at the next tick

    def _head(self, i: int) -> bytes:
        path, auth = TARGETS[i % len(TARGETS)]
        size = "Transfer-Encoding: chunked" if self.kind == "chunked" else "Content-Length: 10000000"
        return (f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"{auth}{size}\r\n\r\n").encode()

    def _piece(self) -> bytes:
        return b"400\r\n" + b"x" * 1024 + b"\r\n" if self.kind == "chunked" else b"x"

    def _connect(self, sel: selectors.BaseSelector, i: int) -> None:
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(self.addr)
            s.sendall(self._head(i))
        except OSError:
            s.close()
            with self._lock:
                self.closed += 1
            self._again.append(i)
            return
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
        with self._lock:
            self.opened += 1

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for i in range(self.n):
            self._connect(sel, i)
        next_tick = time.monotonic()
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=max(0.0, next_tick - time.monotonic())):
                self._answered(sel, key)
            if time.monotonic() >= next_tick:
                next_tick += self.interval_s
                again, self._again = self._again, []
                for i in again:
                    self._connect(sel, i)
                for key in list(sel.get_map().values()):
                    try:
                        self.bytes_sent += key.fileobj.send(self._piece())
                    except (BlockingIOError, InterruptedError):
                        pass  # the server is not reading: the piece waits for the next tick
                    except OSError:
                        self._drop(sel, key, None)
        for key in list(sel.get_map().values()):
            sel.unregister(key.fileobj)
            key.fileobj.close()
        sel.close()

    def _answered(self, sel: selectors.BaseSelector, key) -> None:
        try:
            data = key.fileobj.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        status = None
        if data.startswith(b"HTTP/1."):
            parts = data.split(b" ", 2)
            status = parts[1].decode() if len(parts) > 1 else None
        self._drop(sel, key, status)

    def _drop(self, sel: selectors.BaseSelector, key, status) -> None:
        """The server answered (``status``) or closed: count it, close, connect again."""
        sel.unregister(key.fileobj)
        key.fileobj.close()
        with self._lock:
            if status is None:
                self.closed += 1
            else:
                self.answers[status] = self.answers.get(status, 0) + 1
        self._again.append(key.data)

    def stats(self) -> dict:
        with self._lock:
            return {"connections": self.n, "kind": self.kind, "interval_s": self.interval_s,
                    "targets": [f"{p} ({'wrong token' if a else 'no token'})" for p, a in TARGETS], "opened": self.opened, "answers": dict(sorted(self.answers.items())),
                    "closed_without_answer": self.closed, "body_bytes_sent": self.bytes_sent}

    def __enter__(self) -> "SlowBodies":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def slow_bodies_level(url: str, users: list[str], concurrency: int, n_requests: int, k: int, token: str | None,
                      n_hostile: int, kind: str = "trickle", settle_s: float = 3.0) -> dict:
    """Authenticated recommendations (:func:`bundlerec.serving.loadtest.http_level`) alone, then
    beside ``n_hostile`` :class:`SlowBodies` connections; ``p99_ratio`` is loaded over alone."""
    from bundlerec.serving.loadtest import http_level

    for _ in range(20):  # warm the replicas and the proxy
        http_level(url, users, 1, 1, k, token)
    alone = http_level(url, users, concurrency, n_requests, k, token)
    with SlowBodies(url, n_hostile, kind) as hostile:
        time.sleep(settle_s)  # every hostile connection is open and trickling before the measurement
        loaded = http_level(url, users, concurrency, n_requests, k, token)
        seen = hostile.stats()
    return {"date": datetime.now(timezone.utc).isoformat(), "url": url, "alone": alone, "with_slow_bodies": loaded, "slow_bodies": seen,
            "p50_ratio": loaded["p50_ms"] / alone["p50_ms"], "p99_ratio": loaded["p99_ms"] / alone["p99_ms"]}
