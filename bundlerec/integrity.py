"""Directories committed whole: a manifest of every file (size + SHA-256) written last, verified
before use, and directories built in a staging folder and swapped in.

    with staged("runs/demo/export") as tmp:     # written beside the target, swapped in when complete
        write_everything(tmp)
    with amend("runs/demo/export"):             # a later stage adds files: verified before, re-sealed after
        add_pricing("runs/demo/export")
    require("runs/demo/export")                 # IntegrityError naming the first problem
    local = workdir_for("s3://b/run/export")    # an object-store target: built in a local folder,
    ...; publish(local, "s3://b/run/export")    # uploaded with the manifest last (the commit)
    checkout("s3://b/run/export")               # a verified local copy to read or amend

A writer that stops half-way leaves either the old directory (``staged``) or files that disagree
with the manifest (``amend``); both are refused by :func:`verify` instead of being served. Files
whose name starts with ``.`` are not part of the content (editor and OS droppings, our temp files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Iterator, Optional

from bundlerec.storage import is_uri

MANIFEST = "MANIFEST.json"


class IntegrityError(RuntimeError):
    """A directory whose files do not match its manifest (torn write, damage, or no manifest)."""


def sha256_file(path: str, fs=None) -> str:
    """SHA-256 of a local file, or of ``path`` on the pyarrow filesystem ``fs`` (object stores)."""
    h = hashlib.sha256()
    with (fs.open_input_stream(path) if fs is not None else open(path, "rb")) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(root: str) -> str:
    """SHA-256 of ``root``/MANIFEST.json. The manifest lists every file with its SHA-256, so this one
    digest, pinned where the directory cannot be rewritten (the registry's version tag), names one
    exact export: a re-sealed one (files changed and the manifest recomputed) has another digest."""
    return sha256_file(os.path.join(root, MANIFEST))


def _files(root: str) -> list[str]:
    """Relative paths of the content files under ``root`` (no dot-files or dot-folders, no manifest)."""
    out = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [os.path.relpath(os.path.join(d, n), root) for n in sorted(names)
                if not n.startswith(".") and n != MANIFEST]
    return out


def file_table(root: str) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every content file under ``root``."""
    return {rel: {"size": os.path.getsize(os.path.join(root, rel)), "sha256": sha256_file(os.path.join(root, rel))}
            for rel in _files(root)}


def check_table(root: str, files: dict[str, dict], hashes: bool = True) -> Optional[str]:
    """None when every listed file has its size (and hash); else the first problem."""
    for rel, meta in files.items():
        p = os.path.join(root, rel)
        if not os.path.isfile(p):
            return f"missing {rel}"
        if os.path.getsize(p) != meta["size"]:
            return f"{rel}: {os.path.getsize(p)} bytes, expected {meta['size']}"
        if hashes and sha256_file(p) != meta["sha256"]:
            return f"{rel}: content hash differs"
    return None


def seal(root: str, **extra) -> dict:
    """Write ``root``/MANIFEST.json (atomically, last) listing every file now in ``root``."""
    doc = {"files": file_table(root), **extra}
    tmp = os.path.join(root, f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, MANIFEST))
    return doc


def verify(root: str, hashes: bool = True) -> tuple[bool, str]:
    """(ok, why): the manifest is there, every listed file matches it, and no unlisted file was added
    (a later writer that stopped before re-sealing). ``root`` may be an object-store URI."""
    if is_uri(root):
        return _verify_remote(root, hashes)
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return False, f"no {MANIFEST} (incomplete, or written before manifests)"
    except (OSError, ValueError, KeyError) as e:
        return False, f"unreadable {MANIFEST} ({e})"
    problem = check_table(root, files, hashes)
    if problem:
        return False, problem
    extra = sorted(set(_files(root)) - set(files))
    if extra:
        return False, f"files not in the manifest (a write did not finish): {extra[:5]}"
    return True, "ok"


def _verify_remote(uri: str, hashes: bool) -> tuple[bool, str]:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
            files = json.loads(f.read())["files"]
    except FileNotFoundError:
        return False, f"no {MANIFEST} (incomplete, or written before manifests)"
    except (OSError, ValueError, KeyError) as e:
        return False, f"unreadable {MANIFEST} ({e})"
    found = {os.path.relpath(i.path, root): i.size for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File}
    for rel, meta in files.items():
        if rel not in found:
            return False, f"missing {rel}"
        if found[rel] != meta["size"]:
            return False, f"{rel}: {found[rel]} bytes, expected {meta['size']}"
        if hashes and sha256_file(f"{root}/{rel}", fs) != meta["sha256"]:
            return False, f"{rel}: content hash differs"
    extra = sorted(r for r in found if r not in files and r != MANIFEST
                   and not any(part.startswith(".") for part in r.split("/")))
    if extra:
        return False, f"files not in the manifest (a write did not finish): {extra[:5]}"
    return True, "ok"


def workdir_for(target: str) -> str:
    """Where a directory bound for ``target`` is built: ``target`` itself when it is local, a fresh
    local folder when it is an object-store URI (then :func:`publish` it)."""
    if not is_uri(target):
        return target
    return os.path.join(tempfile.mkdtemp(prefix="bundlerec-"), os.path.basename(target.rstrip("/")) or "dir")


def publish(local: str, target: str) -> None:
    """Put the sealed directory ``local`` at ``target``. Local: they must be the same folder (it was
    built in place). Object store: ``local`` is verified, the target's old objects are removed
    (manifest included, so readers refuse the directory meanwhile), the files are uploaded and the
    manifest last: the commit, after which readers can verify every object against it."""
    if not is_uri(target):
        if os.path.abspath(local) != os.path.abspath(target):
            raise ValueError(f"publish: {local} was built for {target}; build it with workdir_for({target!r})")
        return
    import pyarrow.fs as pafs

    require(local)
    fs, root = pafs.FileSystem.from_uri(target)
    old = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
           if i.type == pafs.FileType.File]
    for path in sorted(old, key=lambda p: not p.endswith(f"/{MANIFEST}")):  # the old manifest first
        fs.delete_file(path)
    for rel in [*_files(local), MANIFEST]:  # the manifest last (object stores need no folders)
        with open(os.path.join(local, rel), "rb") as src, fs.open_output_stream(f"{root}/{rel}") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def checkout(source: str, what: str = "directory") -> str:
    """A verified local copy of ``source``: ``source`` itself when local (verified), else a fresh
    local folder with the objects (verified against the manifest they were committed with)."""
    if not is_uri(source):
        require(source, what)
        return source
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(source)
    local = workdir_for(source)
    os.makedirs(local)
    pafs.copy_files(root, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    ok, why = verify(local)
    if not ok:
        shutil.rmtree(os.path.dirname(local), ignore_errors=True)
        raise IntegrityError(f"{what} {source} failed verification: {why}. It was not completely written "
                             f"(or was changed afterwards); re-create it with the stage that writes it")
    return local


def require(root: str, what: str = "directory", hashes: bool = True) -> None:
    ok, why = verify(root, hashes)
    if not ok:
        raise IntegrityError(f"{what} {root} failed verification: {why}. It was not completely written "
                             f"(or was changed afterwards); re-create it with the stage that writes it")


@contextlib.contextmanager
def staged(target: str, **extra) -> Iterator[str]:
    """Yield a fresh staging folder beside ``target``; when the block completes, seal it and swap it
    in place of ``target`` (the old one is removed). If the block raises, ``target`` is untouched."""
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.staging-{uuid.uuid4().hex[:12]}")
    os.makedirs(tmp)
    try:
        yield tmp
        seal(tmp, **extra)
        old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
        if os.path.lexists(target):
            os.rename(target, old)  # two renames: a reader sees the old or the new directory, never a mix
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def amend(root: str, what: str = "directory") -> Iterator[str]:
    """Add to or change a sealed directory: it must verify first; it is re-sealed when the block
    completes. A block that raises leaves it unsealed-for-the-change, so loaders refuse it."""
    require(root, what)
    yield root
    seal(root, **{k: v for k, v in _manifest(root).items() if k != "files"})


def _manifest(root: str) -> dict:
    with open(os.path.join(root, MANIFEST)) as f:
        return json.load(f)
