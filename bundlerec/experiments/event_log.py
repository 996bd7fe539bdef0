"""Durable impression and feedback logs of the Serve app: write-ahead lines, then Parquet.

Every event is appended to the replica's write-ahead segment (JSON lines, written to the OS before
the HTTP answer goes out, so a killed replica loses nothing it acknowledged) and moved to a Parquet
file under ``<event_log_dir>/<kind>/`` every ``flush_s`` seconds, at ``flush_rows`` rows and on
shutdown. A segment is held under an exclusive ``flock`` while its replica lives; any replica on
the node converts segments nobody holds (a killed replica's) at its start and at every flush.
The Parquet file is named after the segment, so converting one twice writes the same file once.

Appends never wait for storage: a full segment is sealed (a new one opened, under the append lock:
local file operations only) and converted to Parquet outside that lock, by the flush thread of
:class:`OnlineLog`, so a slow or absent object store delays the Parquet files, never a request. A
write the write-ahead disk refuses (``ENOSPC``) is cut back to the last whole row and raises
:class:`LogUnavailable`: the caller knows nothing was recorded, and the segment stays clean.

Feedback rows use the clickstream schema (bundlerec.data.schema: event_time, event_type, user_id,
session_id, item_id, price, quantity) plus the experiment's columns, so ``data.events`` can point
at ``<event_log_dir>/feedback`` and shopper feedback becomes the next run's training data.
"""

from __future__ import annotations

import calendar
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
    ("bundle_prices", pa.list_(pa.float64())), ("bundle_optimal_prices", pa.list_(pa.float64())),
    ("bundle_price_propensities", pa.list_(pa.float64())),
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


class LogUnavailable(RuntimeError):
    """The write-ahead disk refused the rows (e.g. full): nothing of them was recorded."""


class EventLog:
    """One kind of event (``impressions`` or ``feedback``) of one replica. Thread-safe.

    ``convert_inline``: sealed segments are converted by the appending call itself (after it has
    released the append lock); :class:`OnlineLog` turns it off and converts from its flush thread."""

    def __init__(self, root: str, kind: str, wal_dir: str, flush_rows: int = 2000, convert_inline: bool = True):
        self.kind, self.schema, self.flush_rows = kind, SCHEMAS[kind], flush_rows
        self.convert_inline = convert_inline
        self.out = storage.join(root if storage.is_uri(root) else storage.absolute(root), kind)
        self.wal = os.path.join(wal_dir, kind)
        os.makedirs(self.wal, exist_ok=True)
        if not storage.is_uri(self.out):
            os.makedirs(self.out, exist_ok=True)
        self._lock = threading.Lock()  # the open segment (appends): held for local writes only
        self._convert_lock = threading.Lock()  # one conversion at a time, outside the append lock
        self._sealed: list[tuple[str, str, int]] = []  # (path, segment, locked fd) waiting for Parquet
        self.written = 0  # rows converted to Parquet by this replica
        self.refused = 0  # appends the write-ahead disk refused
        # the last error of each store, None once it worked again: the write-ahead disk (cleared by the
        # next append it takes) and the Parquet store (cleared by the next conversion that succeeds)
        self.wal_error: str | None = None
        self.store_error: str | None = None
        self.fd: int | None = None
        self._open()

    def _open(self) -> None:
        self.segment = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
        self.path = os.path.join(self.wal, f"{self.segment}.jsonl")
        # created under a name recover() does not look at, locked, then renamed: a segment is never
        # visible unlocked (another replica's recover() would take an empty new segment for a dead one's)
        hidden = os.path.join(self.wal, f".{self.segment}.jsonl.new")
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the segment is converted
        os.rename(hidden, self.path)
        self.fd, self.size, self.pending = fd, 0, 0

    def append(self, rows: list[dict]) -> None:
        """Write ``rows`` to the write-ahead segment (in the OS once this returns), or raise
        :class:`LogUnavailable` with nothing of them written."""
        if not rows:
            return
        data = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in rows).encode()
        with self._lock:
            try:
                if self.fd is None:  # the last segment could not be opened: try again
                    self._open()
                off = 0
                while off < len(data):
                    off += os.write(self.fd, data[off:])
            except OSError as e:
                if self.fd is not None:
                    try:
                        os.ftruncate(self.fd, self.size)  # back to the last whole row: the segment stays clean
                    except OSError:
                        pass
                self.refused += 1
                self.wal_error = f"write-ahead log: {e}"
                raise LogUnavailable(f"{self.kind} not recorded: {e}") from e
            self.wal_error = None
            self.size += len(data)
            self.pending += len(rows)
            if self.pending >= self.flush_rows:
                self._seal()
        if self.convert_inline:
            self.convert_sealed()

    def _seal(self) -> None:
        """Queue the open segment for conversion and open a new one (caller holds the append lock)."""
        self._sealed.append((self.path, self.segment, self.fd))
        self.fd, self.pending = None, 0
        try:
            self._open()
        except OSError as e:  # the disk is full: the next append tries again
            self.wal_error = f"write-ahead log: {e}"

    def convert_sealed(self) -> int:
        """Convert the sealed segments to Parquet (outside the append lock); a failure keeps them for
        the next call and raises."""
        with self._convert_lock:
            with self._lock:
                todo, self._sealed = self._sealed, []
            n = 0
            try:
                while todo:
                    path, segment, fd = todo[0]
                    n += self._convert(path, segment)
                    os.remove(path)
                    os.close(fd)  # the lock goes with it
                    todo.pop(0)
                self.store_error = None
            except Exception as e:
                self.store_error = f"conversion: {e}"
                raise
            finally:
                if todo:
                    with self._lock:
                        self._sealed = todo + self._sealed
            return n

    @property
    def last_error(self) -> str | None:
        """The write-ahead disk's error, else the Parquet store's; None when both work (/readyz)."""
        return self.wal_error or self.store_error

    @property
    def backlog(self) -> int:
        """Sealed segments not yet in Parquet."""
        return len(self._sealed)

    def flush(self) -> None:
        with self._lock:
            if self.pending:
                self._seal()
        self.convert_sealed()

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self.fd is not None:
                os.close(self.fd)
                if os.path.exists(self.path):
                    os.remove(self.path)  # empty: every row went to Parquet with the flush
            self.fd = None

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
            # hidden until renamed: Arrow, Ray Data and Spark skip dot files when they list the folder
            tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, target)
        self.written += len(rows)
        return len(rows)

    def prune(self, max_age_s: float, now: float | None = None) -> int:
        """Delete this log's Parquet files whose segment began more than ``max_age_s`` ago (the UTC
        time at the start of every file's name; a file named otherwise is left alone); returns how many.
        Replicas prune the same folder: a file another one deleted first is skipped."""
        import pyarrow.fs as pafs

        fs, base = pafs.FileSystem.from_uri(self.out)
        cutoff, n = (time.time() if now is None else now) - max_age_s, 0
        for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
            if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
                continue
            try:
                began = calendar.timegm(time.strptime(info.base_name[:15], "%Y%m%dT%H%M%S"))
            except ValueError:
                continue
            if began < cutoff:
                try:
                    fs.delete_file(info.path)
                    n += 1
                except FileNotFoundError:
                    pass
        if n:
            log.info("bundlerec: deleted %d %s files older than %.1f days (serve event_log_retention_days)",
                     n, self.kind, max_age_s / 86400)
        return n

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


PRUNE_EVERY_S = 3600.0  # how often a replica applies the event log's retention


class OnlineLog:
    """Impressions + feedback of one replica, flushed by a background thread every ``flush_s``;
    with ``retention_days`` > 0 the same thread deletes older Parquet files at its first flush and
    every :data:`PRUNE_EVERY_S` after."""

    def __init__(self, root: str, flush_s: float = 5.0, retention_days: float = 0.0):
        self.retention_s = retention_days * 86400.0
        wal = wal_dir_for(root)
        self.impressions = EventLog(root, "impressions", wal, convert_inline=False)
        self.feedback = EventLog(root, "feedback", wal, convert_inline=False)
        self.recovered = self.impressions.recover() + self.feedback.recover()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(flush_s,), daemon=True, name="event-log")
        self._thread.start()

    def _loop(self, flush_s: float) -> None:
        next_prune = 0.0
        while not self._stop.wait(flush_s):
            for el in (self.impressions, self.feedback):
                try:
                    el.flush()
                    self.recovered += el.recover()
                except Exception as e:  # storage hiccup: the rows stay in the write-ahead segment
                    log.error("bundlerec: %s flush failed (kept in the write-ahead log): %s", el.kind, e)
            if self.retention_s > 0 and time.time() >= next_prune:
                next_prune = time.time() + PRUNE_EVERY_S
                for el in (self.impressions, self.feedback):
                    try:
                        el.prune(self.retention_s)
                    except Exception as e:  # retried at the next pruning
                        log.error("bundlerec: %s retention failed: %s", el.kind, e)

    def health(self) -> dict:
        """What /readyz reports: whether both logs are healthy, and their backlog and last error."""
        logs = {el.kind: {"backlog_segments": el.backlog, "refused_appends": el.refused, "last_error": el.last_error}
                for el in (self.impressions, self.feedback)}
        return {"ok": all(v["last_error"] is None for v in logs.values()), **logs}

    def close(self) -> None:
        self._stop.set()
        for el in (self.impressions, self.feedback):
            try:
                el.close()
            except Exception as e:  # the rows stay in the write-ahead segments: the next replica converts them
                log.error("bundlerec: %s not converted at shutdown (kept in the write-ahead log): %s", el.kind, e)
