"""Paths that may be local directories or object-store URIs (s3://, gs://), via pyarrow filesystems."""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def parent(path: str) -> str:
    """The folder holding ``path`` (absolute when local)."""
    return posixpath.dirname(path.rstrip("/")) if is_uri(path) else os.path.dirname(os.path.abspath(path))


def absolute(path: str) -> str:
    """Absolute local path (Ray Train storage and Ray Data writers need one), URIs unchanged."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def exists(path: str) -> bool:
    if is_uri(path):
        fs, p = pafs.FileSystem.from_uri(path)
        return fs.get_file_info(p).type != pafs.FileType.NotFound
    return os.path.exists(path)


def makedirs(path: str) -> None:
    if is_uri(path):
        fs, p = pafs.FileSystem.from_uri(path)
        fs.create_dir(p, recursive=True)
    else:
        os.makedirs(path, exist_ok=True)


def reset_dir(path: str) -> None:
    """Empty ``path`` (create it if needed) so a re-run never mixes old and new shards."""
    if is_uri(path):
        fs, p = pafs.FileSystem.from_uri(path)
        fs.create_dir(p, recursive=True)
        fs.delete_dir_contents(p, missing_dir_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)


def write_text(path: str, text: str) -> None:
    if is_uri(path):
        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
    else:  # a temp file renamed over the target: readers see the old text or the new, never half
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def read_text(path: str) -> str:
    if is_uri(path):
        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(p) as f:
            return f.read().decode()
    with open(path) as f:
        return f.read()
