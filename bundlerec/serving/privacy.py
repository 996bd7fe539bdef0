"""Privacy in logs: user ids appear only as short stable digests, never in clear."""

from __future__ import annotations

import hashlib


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
