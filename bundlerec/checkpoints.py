"""Checkpoint integrity: every rank writes a manifest of its files (size + SHA-256) *last*, so a
checkpoint whose upload or write stopped half-way is recognisable; on restore, a checkpoint that
fails verification is skipped for the newest earlier one that passes.

Ray Train registers a checkpoint only after every rank's report completed, but files can still be
damaged later (a disk filling up, a copy interrupted by hand, a storage sync cut short). Without a
check, DeepSpeed would load garbage or crash at every restart and the run could never recover.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from typing import Optional

log = logging.getLogger(__name__)
MANIFEST_DIR = "_bundlerec_manifest"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt_dir: str, rank: int, world_size: int) -> dict:
    """Record this rank's files (all of ``ckpt_dir`` as written locally by this rank)."""
    files = {}
    for root, _, names in os.walk(ckpt_dir):
        for n in names:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, ckpt_dir)
            if not rel.startswith(MANIFEST_DIR):
                files[rel] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
    manifest = {"rank": rank, "world_size": world_size, "files": files}
    os.makedirs(os.path.join(ckpt_dir, MANIFEST_DIR), exist_ok=True)
    tmp = os.path.join(ckpt_dir, MANIFEST_DIR, f".rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f)
    os.replace(tmp, os.path.join(ckpt_dir, MANIFEST_DIR, f"rank{rank}.json"))  # last, atomically
    return manifest


def verify(ckpt_dir: str, world_size: Optional[int] = None) -> tuple[bool, str]:
    """(ok, why): every rank's manifest is present and every listed file has its size and hash."""
    manifests = sorted(glob.glob(os.path.join(ckpt_dir, MANIFEST_DIR, "rank*.json")))
    if not manifests:
        return False, "no manifest (checkpoint incomplete)"
    try:
        docs = [json.load(open(m)) for m in manifests]
    except (OSError, ValueError) as e:
        return False, f"unreadable manifest ({e})"
    expected = world_size or docs[0].get("world_size", len(docs))
    if {d["rank"] for d in docs} != set(range(expected)):
        return False, f"manifests for ranks {sorted(d['rank'] for d in docs)}, expected {expected}"
    for d in docs:
        for rel, meta in d["files"].items():
            p = os.path.join(ckpt_dir, rel)
            if not os.path.exists(p):
                return False, f"missing {rel}"
            if os.path.getsize(p) != meta["size"]:
                return False, f"{rel}: {os.path.getsize(p)} bytes, expected {meta['size']}"
            if _sha256(p) != meta["sha256"]:
                return False, f"{rel}: content hash differs"
    return True, "ok"


def newest_valid(latest_dir: str, world_size: Optional[int] = None) -> Optional[str]:
    """``latest_dir`` if it verifies, else the newest earlier sibling checkpoint that does.

    Ray Train names checkpoints ``checkpoint_<timestamp>`` in one run directory, so name order is
    time order. Returns None when no checkpoint verifies (training then starts over).
    """
    ok, why = verify(latest_dir, world_size)
    if ok:
        return latest_dir
    log.warning("checkpoint %s is damaged (%s); looking for an earlier one", latest_dir, why)
    parent = os.path.dirname(os.path.normpath(latest_dir))
    prefix = os.path.basename(os.path.normpath(latest_dir)).split("_")[0]
    for cand in sorted(glob.glob(os.path.join(parent, f"{prefix}_*")), reverse=True):
        if os.path.normpath(cand) >= os.path.normpath(latest_dir) or not os.path.isdir(cand):
            continue
        ok, why = verify(cand, world_size)
        if ok:
            log.warning("resuming from earlier checkpoint %s", cand)
            return cand
        log.warning("checkpoint %s is damaged too (%s)", cand, why)
    return None
