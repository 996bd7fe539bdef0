"""Traffic split inside a replica: sticky arm assignment and signed impression ids.

* **Assignment** is a hash of (experiment salt, unit) -> [0, 1) -> the arm whose cumulative share
  covers it: deterministic, the same in every replica, sticky per user (or per session for
  anonymous shoppers), reshuffled by a new salt. No state is kept anywhere.
* **Impression ids** carry what feedback needs (unit, experiment, arm, model version, time) under
  an HMAC, so any replica can validate feedback against an id another replica issued, and a forged
  or altered id is refused. The key is the Serve app's user key (``serve.user_key_file``); without
  one it is derived from the model URI, which makes ids tamper-evident but not secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import Optional


def bucket(salt: str, unit: str) -> float:
    """Uniform in [0, 1) for a (salt, unit) pair: the first 8 bytes of SHA-256, over 2**64."""
    return int.from_bytes(hashlib.sha256(f"{salt}\x1f{unit}".encode()).digest()[:8], "big") / 2.0 ** 64


def assign(spec: dict, unit: str) -> str:
    """The arm of ``unit`` under experiment ``spec`` (registry form: arms -> {model, share}), arms in
    name order so every replica agrees."""
    u, edge = bucket(spec["salt"], unit), 0.0
    arms = sorted(spec["arms"])
    for arm in arms:
        edge += float(spec["arms"][arm]["share"])
        if u < edge:
            return arm
    return arms[-1]  # shares summing to 1 - 1e-12


def new_session_id() -> str:
    """The assignment unit of an anonymous shopper, returned in the answer to be sent back."""
    return "anon-" + os.urandom(12).hex()


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class ImpressionSigner:
    """Issue and check impression ids: ``<payload>.<tag>``, payload = base64url JSON."""

    def __init__(self, key: bytes):
        self.key = hashlib.sha256(b"bundlerec-impression\x00" + key).digest()  # never the user key itself

    def _tag(self, payload: str) -> str:
        return _b64(hmac.new(self.key, payload.encode(), hashlib.sha256).digest()[:16])

    def issue(self, unit: str, experiment: Optional[str], arm: Optional[str], version: Optional[str],
              endpoint: str) -> tuple[str, dict]:
        fields = {"u": unit, "e": experiment, "a": arm, "v": version, "p": endpoint,
                  "t": int(time.time() * 1e6), "n": os.urandom(6).hex()}
        # UTF-8, not \u escapes: a 128-character user id of any script keeps the id under the 1,024
        # characters POST /v1/feedback takes (escaped, 128 CJK characters made 1,190)
        payload = _b64(json.dumps(fields, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode())
        return f"{payload}.{self._tag(payload)}", fields

    def check(self, impression_id: str) -> dict:
        """The impression's fields, or ValueError for an id this service did not issue (whatever
        characters it holds: an id is base64url ASCII)."""
        payload, _, tag = impression_id.partition(".")
        if not (tag and impression_id.isascii()) or not hmac.compare_digest(tag.encode(), self._tag(payload).encode()):
            raise ValueError("not an impression id issued by this service")
        return json.loads(_unb64(payload))


@dataclass
class Experiment:
    """A running experiment as one replica holds it: the registry spec (arm -> version resolved)
    and each arm's loaded, checked model (bundlerec.serving.app.Loaded)."""

    spec: dict
    arms: dict

    @property
    def name(self) -> str:
        return self.spec["name"]

    def route(self, unit: str):
        arm = assign(self.spec, unit)
        return arm, self.arms[arm]
