"""Privacy: user ids never appear in clear in logs, nor in the model artifact.

* Logs: short stable digests (:func:`hash_id`, :func:`redact`).
* Exports: the per-user histories (``latest.parquet``) are keyed by a pseudonym, an HMAC-SHA256 of
  the user id under a secret key (``serve.user_key_file``, created with mode 0600 on first export,
  kept out of every artifact). Serve replicas and the pyfunc read the same key to find a shopper's
  history from the id a request carries; without it a pseudonym cannot be linked to a user id.
  A request may also name a user by pseudonym directly (``"pseudo:<hex>"``: what the explorer page
  lists), so nothing outside the key holder needs clear ids.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Optional

PSEUDO_PREFIX = "pseudo:"
SCHEME = "hmac-sha256-128"  # the export's meta "user_ids" value


def hash_id(value: object) -> str:
    """Short stable digest of a user id (or any identifier) for logs."""
    return hashlib.sha256(str(value).encode()).hexdigest()[:12]


def redact(obj):
    """A copy of a JSON-like object with every ``user_id`` value replaced by its hash (for logs)."""
    if isinstance(obj, dict):
        return {k: (f"<user {hash_id(v)}>" if k == "user_id" and v is not None else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def pseudonym(user_id: object, key: bytes) -> str:
    """The keyed pseudonym of a user id (128 bits of HMAC-SHA256, hex)."""
    return hmac.new(key, str(user_id).encode(), hashlib.sha256).hexdigest()[:32]


def read_user_key(path: str) -> bytes:
    from bundlerec.storage import read_text

    key = read_text(path).strip()
    if len(key) < 32:
        raise ValueError(f"user key in {path} is too short ({len(key)} characters; at least 32)")
    return key.encode()


def ensure_user_key(path: str) -> bytes:
    """The key in ``path``, created (64 hex characters, mode 0600) when the file does not exist.
    On a multi-node cluster the path must be shared storage or a secret mounted at the same path on
    every node: a node that creates its own key would export pseudonyms nobody can look up."""
    if "://" in path or os.path.exists(path):
        return read_user_key(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return read_user_key(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return read_user_key(path)


def lookup_key(user_id: str, key: Optional[bytes], pseudonymized: bool) -> str:
    """The key of ``latest`` to look a request's user up under."""
    uid = str(user_id)
    if uid.startswith(PSEUDO_PREFIX):
        return uid[len(PSEUDO_PREFIX):]
    if pseudonymized and key is not None:
        return pseudonym(uid, key)
    return uid
