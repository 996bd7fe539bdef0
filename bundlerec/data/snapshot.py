"""Prep output as immutable snapshots, committed by one write of ``manifest.json``.

    <output_dir>/manifest.json                    the commit: counts, config, and which snapshot is current
    <output_dir>/snapshots/<time>-<id>/items/     one prep run's files (examples/, items/, quarantine/, raw/)

Each prep run writes a new snapshot folder and, only when every file is written, replaces
``manifest.json`` (an atomic rename locally, a single PUT on object storage). So a failed re-run
leaves the previous manifest pointing at the previous, complete snapshot; two preps into one folder
each write their own snapshot and the last to finish is current; no reader ever sees a mix. The
manifest lists every snapshot file with size and SHA-256 and every input file with size and
SHA-256 (and the ones the reader skips, with why); :func:`verify` checks them before training.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from datetime import datetime, timezone
from typing import Optional

import pyarrow.fs as pafs

from bundlerec.integrity import sha256_file
from bundlerec.storage import absolute, is_uri, join, read_text, write_text

log = logging.getLogger(__name__)

SNAPSHOTS = "snapshots"
KEEP = 2  # the current snapshot and the one before (a job that started on it may still read it)


class PrepIntegrityError(RuntimeError):
    """Prep output whose files do not match its manifest."""


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path if is_uri(path) else absolute(path))


def new_snapshot() -> str:
    """Relative folder of a new snapshot (sortable by time, unique across concurrent runs)."""
    return posixpath.join(SNAPSHOTS, f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}")


def file_table(root: str) -> dict[str, dict]:
    """{path relative to root: {size, sha256}} of every file under ``root`` (local or URI)."""
    fs, base = _fs(root)
    out = {}
    for i in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
        if i.type == pafs.FileType.File:
            out[posixpath.relpath(i.path, base)] = {"size": i.size, "sha256": sha256_file(i.path, fs)}
    return dict(sorted(out.items()))


def input_table(path: Optional[str], read: list[str]) -> dict:
    """The input files prep read (size + SHA-256), and the files beside them it did not read
    (names starting with ``_`` or ``.``: Spark/Hadoop markers, hidden files) with the reason."""
    if path is None:
        return {"files": [], "skipped": []}
    files = []
    for f in read:
        fs, p = _fs(f)
        files.append({"path": f, "size": fs.get_file_info(p).size, "sha256": sha256_file(p, fs)})
    skipped = []
    if not any(ch in path for ch in "*?["):
        fs, base = _fs(path)
        if fs.get_file_info(base).type == pafs.FileType.Directory:
            for i in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
                if i.type == pafs.FileType.File and posixpath.basename(i.path).startswith(("_", ".")):
                    skipped.append({"path": i.path, "size": i.size,
                                    "reason": "name starts with '_' or '.' (marker or hidden file): not read"})
    return {"files": files, "skipped": skipped}


def data_root(prep_dir: str) -> str:
    """Where the current snapshot's files are: <prep_dir>/<snapshot> (or prep_dir itself for
    prep-format folders written without snapshots, e.g. by jobs.eval_bundles)."""
    try:
        snap = json.loads(read_text(join(prep_dir, "manifest.json"))).get("snapshot")
    except FileNotFoundError:
        return prep_dir
    return join(prep_dir, snap) if snap else prep_dir


def commit(out: str, manifest: dict) -> None:
    """Make ``manifest`` (with its ``snapshot``) current, then delete committed snapshots older than
    the previous one. Snapshots that were never committed (a failed or still-running prep) are left
    and reported: deleting them could pull files from under a concurrent run."""
    previous = []
    try:
        old = json.loads(read_text(join(out, "manifest.json")))
        previous = [s for s in [old.get("snapshot"), *old.get("previous_snapshots", [])] if s]
    except (FileNotFoundError, ValueError):
        pass
    manifest["previous_snapshots"] = [s for s in previous if s != manifest["snapshot"]][:KEEP - 1]
    write_text(join(out, "manifest.json"), json.dumps(manifest, indent=2, default=str))  # the commit
    fs, base = _fs(out)
    for s in previous[KEEP - 1:]:
        if s not in (manifest["snapshot"], *manifest["previous_snapshots"]):
            fs.delete_dir(posixpath.join(base, s))
    known = {manifest["snapshot"], *manifest["previous_snapshots"]}
    orphans = [posixpath.join(SNAPSHOTS, posixpath.basename(i.path))
               for i in fs.get_file_info(pafs.FileSelector(posixpath.join(base, SNAPSHOTS), allow_not_found=True))
               if i.type == pafs.FileType.Directory]
    orphans = [o for o in orphans if o not in known and o not in previous]
    if orphans:
        log.warning("prep: %d snapshot(s) in %s were never committed (a failed prep, or one still running): %s",
                    len(orphans), out, orphans[:5])


def verify(prep_dir: str, manifest: Optional[dict] = None, hashes: bool = True) -> None:
    """Raise PrepIntegrityError unless every file the manifest lists has its size (and hash)."""
    manifest = manifest or json.loads(read_text(join(prep_dir, "manifest.json")))
    if "files" not in manifest:
        return  # prep-format folders without a file table (jobs.eval_bundles' working copy)
    root = data_root(prep_dir)
    fs, base = _fs(root)
    for rel, meta in manifest["files"].items():
        p = posixpath.join(base, rel)
        info = fs.get_file_info(p)
        why = ("missing" if info.type != pafs.FileType.File else
               f"{info.size} bytes, expected {meta['size']}" if info.size != meta["size"] else
               "content hash differs" if hashes and sha256_file(p, fs) != meta["sha256"] else None)
        if why:
            raise PrepIntegrityError(f"prep output {root}: {rel} {why}; re-run prep (python -m jobs.prep)")
