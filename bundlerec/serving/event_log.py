"""Durable impression and feedback logs of the Serve app: write-ahead lines, then Parquet.

Every event is appended to the replica's write-ahead segment (JSON lines, written to the OS before
the HTTP answer goes out, so a killed replica loses nothing it acknowledged) and moved to a Parquet
file under ``<event_log_dir>/<kind>/`` every ``flush_s`` seconds, at ``flush_rows`` rows and on
shutdown. A segment is held under an exclusive ``flock`` while its replica lives; any replica on
the node converts segments nobody holds (a killed replica's) at its start and at every flush.
The Parquet file is named after the segment, so converting one twice writes the same file once.

Feedback rows use the clickstream schema (bundlerec.data.schema: event_time, event_type, user_id,
session_id, item_id, price, quantity) plus the experiment's columns, so ``data.events`` can point
at ``<event_log_dir>/feedback`` and shopper feedback becomes the next run's training data.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from bundlerec import storage

log = logging.getLogger("ray.serve")

TS = pa.timestamp("us", tz="UTC")
IMPRESSION_SCHEMA = pa.schema([
    ("impression_id", pa.string()), ("event_time", TS), ("experiment", pa.string()), ("arm", pa.string()),
    ("model_name", pa.string()), ("model_version", pa.string()), ("endpoint", pa.string()),
    ("user_id", pa.string()), ("session_id", pa.string()), ("items", pa.list_(pa.string())),
    ("bundle_items", pa.list_(pa.list_(pa.string()))), ("bundle_list_prices", pa.list_(pa.float64())),
    ("bundle_prices", pa.list_(pa.float64())),
])
FEEDBACK_SCHEMA = pa.schema([
    ("event_time", TS), ("event_type", pa.string()), ("user_id", pa.string()), ("session_id", pa.string()),
    ("item_id", pa.string()), ("price", pa.float64()), ("quantity", pa.int64()),
    ("impression_id", pa.string()), ("event_id", pa.string()), ("feedback_type", pa.string()),
    ("experiment", pa.string()), ("arm", pa.string()), ("model_version", pa.string()),
    ("bundle_index", pa.int64()), ("revenue", pa.float64()), ("received_time", TS),
])
SCHEMAS = {"impressions": IMPRESSION_SCHEMA, "feedback": FEEDBACK_SCHEMA}


def wal_dir_for(event_log_dir: str) -> str:
    """Write-ahead segments live on local disk: beside the logs, or in the user's cache for object stores."""
    if storage.is_uri(event_log_dir):
        return os.path.expanduser("~/.cache/bundlerec/wal")
    return os.path.join(storage.absolute(event_log_dir), "_wal")


class EventLog:
    """One kind of event (``impressions`` or ``feedback``) of one replica. Thread-safe."""

    def __init__(self, root: str, kind: str, wal_dir: str, flush_rows: int = 2000):
        self.kind, self.schema, self.flush_rows = kind, SCHEMAS[kind], flush_rows
        self.out = storage.join(root if storage.is_uri(root) else storage.absolute(root), kind)
        self.wal = os.path.join(wal_dir, kind)
        os.makedirs(self.wal, exist_ok=True)
        if not storage.is_uri(self.out):
            os.makedirs(self.out, exist_ok=True)
        self._lock = threading.Lock()
        self.written = 0  # rows converted to Parquet by this replica
        self._open()

    def _open(self) -> None:
        self.segment = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
        self.path = os.path.join(self.wal, f"{self.segment}.jsonl")
        # created under a name recover() does not look at, locked, then renamed: a segment is never
        # visible unlocked (another replica's recover() would take an empty new segment for a dead one's)
        hidden = os.path.join(self.wal, f".{self.segment}.jsonl.new")
        self.f = open(hidden, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while this replica lives
        os.rename(hidden, self.path)
        self.pending = 0

    def append(self, rows: list[dict]) -> None:
        """Write ``rows`` to the write-ahead segment (in the OS once this returns)."""
        if not rows:
            return
        text = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in rows)
        with self._lock:
            self.f.write(text)
            self.f.flush()
            self.pending += len(rows)
            if self.pending >= self.flush_rows:
                try:
                    self._rotate()
                except Exception as e:  # the rows are safe in the segment; the next flush retries
                    log.error("bundlerec: %s flush failed (kept in the write-ahead log): %s", self.kind, e)

    def flush(self) -> None:
        with self._lock:
            if self.pending:
                self._rotate()

    def close(self) -> None:
        with self._lock:
            if self.pending:
                self._convert(self.path, self.segment)
            self.f.close()
            if os.path.exists(self.path) and not self.pending:
                os.remove(self.path)
            self.pending = 0

    def _rotate(self) -> None:
        path, segment, f = self.path, self.segment, self.f
        self._convert(path, segment)  # still locked: no other replica converts it meanwhile
        os.remove(path)
        f.close()
        self._open()

    def _convert(self, path: str, segment: str) -> int:
        rows = []
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: never acknowledged
                    log.warning("bundlerec: %s: a torn last line skipped", path)
        if not rows:
            return 0
        cols = {}
        for field in self.schema:
            vals = [r.get(field.name) for r in rows]
            cols[field.name] = (pa.array(vals, pa.int64()).cast(TS) if field.type == TS else pa.array(vals, field.type))
        table = pa.table(cols, schema=self.schema)
        target = storage.join(self.out, f"{segment}.parquet")
        if storage.is_uri(target):
            import pyarrow.fs as pafs

            fs, p = pafs.FileSystem.from_uri(target)
            pq.write_table(table, p, filesystem=fs)  # one PUT: the object appears whole
        else:
            tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, target)
        self.written += len(rows)
        return len(rows)

    def recover(self) -> int:
        """Convert the segments no live replica holds (killed replicas'); returns rows recovered."""
        n = 0
        for path in sorted(glob.glob(os.path.join(self.wal, "*.jsonl"))):
            if path == self.path:
                continue
            try:
                f = open(path)
            except FileNotFoundError:
                continue
            with f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live replica's segment
                if not os.path.exists(path):  # converted and removed between glob and lock
                    continue
                n += self._convert(path, os.path.basename(path)[:-len(".jsonl")])
                os.remove(path)
        if n:
            log.warning("bundlerec: recovered %d %s rows from a stopped replica's write-ahead log", n, self.kind)
        return n


class OnlineLog:
    """Impressions + feedback of one replica, flushed by a background thread every ``flush_s``."""

    def __init__(self, root: str, flush_s: float = 5.0):
        wal = wal_dir_for(root)
        self.impressions = EventLog(root, "impressions", wal)
        self.feedback = EventLog(root, "feedback", wal)
        self.recovered = self.impressions.recover() + self.feedback.recover()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(flush_s,), daemon=True, name="event-log")
        self._thread.start()

    def _loop(self, flush_s: float) -> None:
        while not self._stop.wait(flush_s):
            for el in (self.impressions, self.feedback):
                try:
                    el.flush()
                    self.recovered += el.recover()
                except Exception as e:  # storage hiccup: the rows stay in the write-ahead segment
                    log.error("bundlerec: %s flush failed (kept in the write-ahead log): %s", el.kind, e)

    def close(self) -> None:
        self._stop.set()
        for el in (self.impressions, self.feedback):
            el.close()
