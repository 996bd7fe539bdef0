"""Checkpoint integrity: every rank writes a manifest of its files (size + SHA-256) *last*, so a
checkpoint whose upload or write stopped half-way is recognisable; on restore, a checkpoint that
fails verification is skipped for the newest earlier one that passes.

Ray Train registers a checkpoint only after every rank's report completed, but files can still be
damaged later (a disk filling up, a copy interrupted by hand, a storage sync cut short). Without a
check, DeepSpeed would load garbage or crash at every restart and the run could never recover.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import posixpath
from typing import Iterator, Optional

from bundlerec.integrity import check_table, sha256_file
from bundlerec.storage import is_uri

log = logging.getLogger(__name__)
MANIFEST_DIR = "_bundlerec_manifest"


def write_manifest(ckpt_dir: str, rank: int, world_size: int) -> dict:
    """Record this rank's files (all of ``ckpt_dir`` as written locally by this rank)."""
    files = {}
    for root, _, names in os.walk(ckpt_dir):
        for n in names:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, ckpt_dir)
            if not rel.startswith(MANIFEST_DIR):
                files[rel] = {"size": os.path.getsize(p), "sha256": sha256_file(p)}
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
        problem = check_table(ckpt_dir, d["files"])
        if problem:
            return False, problem
    return True, "ok"


@contextlib.contextmanager
def newest_valid(ckpt, world_size: Optional[int] = None) -> Iterator[Optional[str]]:
    """Yield a local directory with the newest intact checkpoint: ``ckpt`` (a ``ray.train.Checkpoint``)
    if it verifies, else the newest earlier sibling that does, on the same storage, local or remote
    (each candidate is fetched and verified). Yields None when none verifies (training starts over).

    Ray Train names checkpoints ``checkpoint_<timestamp>`` in one run directory, so name order is
    time order.
    """
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, latest = ckpt.filesystem, ckpt.path.rstrip("/")
    parent, name = posixpath.split(latest)
    prefix = name.split("_")[0] + "_"
    dirs = [i.path.rstrip("/") for i in fs.get_file_info(pafs.FileSelector(parent))
            if i.type == pafs.FileType.Directory]
    earlier = sorted((p for p in dirs if posixpath.basename(p).startswith(prefix) and posixpath.basename(p) < name),
                     reverse=True)
    for path in [latest, *earlier]:
        with Checkpoint(path, filesystem=fs).as_directory() as d:
            ok, why = verify(d, world_size)
            if ok:
                if path != latest:
                    log.warning("resuming from earlier checkpoint %s", path)
                yield d
                return
        log.warning("checkpoint %s is damaged (%s)%s", path, why,
                    "; looking for an earlier one" if path == latest else "")
    yield None


def saved_world_size(ckpt_dir: str) -> int:
    """How many ranks wrote the (verified) checkpoint in ``ckpt_dir``."""
    with open(os.path.join(ckpt_dir, MANIFEST_DIR, "rank0.json")) as f:
        return int(json.load(f)["world_size"])


@contextlib.contextmanager
def universal(ckpt_dir: str) -> Iterator[str]:
    """The DeepSpeed checkpoint in ``ckpt_dir`` (any ZeRO stage, written by any number of ranks) as
    DeepSpeed's *universal* checkpoint, in a temporary directory an engine configured with
    ``checkpoint.load_universal`` loads with any number of ranks: parameters, AdamW moments and step,
    scheduler and client state. Each rank converts for itself (ranks on other nodes share no disk);
    the temporary copy takes about 3x the fp32 parameters (weights + two moments)."""
    import argparse
    import tempfile

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tag = open(os.path.join(ckpt_dir, "latest")).read().strip()
    with tempfile.TemporaryDirectory(prefix="bundlerec-universal-") as tmp:
        args = argparse.Namespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=os.path.join(tmp, tag),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # our checkpoints carry no Megatron-style info
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # per-parameter chatter
            ds_to_universal(args)
        with open(os.path.join(tmp, "latest_universal"), "w") as f:
            f.write(tag)
        yield tmp


SNAPSHOT = "checkpoint_manager_snapshot.json"


def recover_torn_snapshot(storage_path: str, run_name: str):
    """Ray Train writes its run's ``checkpoint_manager_snapshot.json`` in place (not atomically): a disk
    that fills up while it is written leaves it torn, and a restarted run then fails at once parsing
    it. When it is unreadable, move it aside (``.torn-<time>``) and return the run's newest checkpoint
    (a ``ray.train.Checkpoint``, for ``resume_from_checkpoint``; :func:`newest_valid` then walks back to
    an intact one). The same when there is no snapshot but the run has checkpoints (one moved aside by
    an earlier attempt that was itself stopped before it reported a checkpoint): Ray Train would start
    that run over. None when the snapshot is fine or the run has no checkpoints."""
    import time

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, root = pafs.FileSystem.from_uri(storage_path if is_uri(storage_path) else os.path.abspath(storage_path))
    run_dir = posixpath.join(root, run_name)
    if fs.get_file_info(run_dir).type == pafs.FileType.NotFound:
        return None
    snap = posixpath.join(run_dir, SNAPSHOT)
    if fs.get_file_info(snap).type == pafs.FileType.NotFound:
        why = "missing"
    else:
        try:
            with fs.open_input_stream(snap) as f:
                json.loads(f.read())
            return None
        except (ValueError, OSError) as e:
            why = f"unreadable ({e}; a disk that filled up while it was written?): moved aside"
        fs.move(snap, f"{snap}.torn-{int(time.time())}")
    ckpts = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(run_dir))
                   if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith("checkpoint_"))
    if not ckpts:
        return None
    log.warning("Ray Train's %s of run %s is %s; resuming from the newest intact checkpoint at or before %s",
                SNAPSHOT, run_name, why, ckpts[-1])
    return Checkpoint(ckpts[-1], filesystem=fs)
