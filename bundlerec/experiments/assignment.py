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


IMPRESSION_TTL_S = 30 * 86400  # feedback on an answer older than this is refused
CLOCK_SKEW_S = 300  # an event may be dated this much before its answer was issued (client clocks)
PRICE_CAP = 10.0  # a price paid above this many times the catalog (list) price is refused


class ImpressionSigner:
    """Issue and check impression ids: ``<payload>.<tag>``, payload = base64url JSON.

    The payload binds what the answer showed: a 4-byte keyed tag of each shown item (``s``) and the
    size of each group (``g``: one group for recommendations, one per bundle), so feedback can be
    checked against the answer by any replica (:func:`bound_feedback`) without shared state."""

    def __init__(self, key: bytes):
        self.key = hashlib.sha256(b"bundlerec-impression\x00" + key).digest()  # never the user key itself

    def _tag(self, payload: str) -> str:
        return _b64(hmac.new(self.key, payload.encode(), hashlib.sha256).digest()[:16])

    def item_tag(self, item_id: str) -> bytes:
        """The 4-byte keyed tag of a shown item (a guessed tag matches 1 time in 2**32)."""
        return hmac.new(self.key, b"item\x00" + str(item_id).encode("utf-8", "surrogatepass"), hashlib.sha256).digest()[:4]

    def issue(self, unit: str, experiment: Optional[str], arm: Optional[str], version: Optional[str],
              endpoint: str, shown: Optional[list[list[str]]] = None) -> tuple[str, dict]:
        """``shown``: the answer's items in groups (recommendations: one group; bundles: one per bundle)."""
        groups = [list(g) for g in (shown or [])]
        fields = {"u": unit, "e": experiment, "a": arm, "v": version, "p": endpoint,
                  "t": int(time.time() * 1e6), "n": os.urandom(6).hex(),
                  "s": _b64(b"".join(self.item_tag(i) for g in groups for i in g)), "g": [len(g) for g in groups]}
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
        fields = json.loads(_unb64(payload))
        if "s" not in fields or "g" not in fields:
            raise ValueError("an impression id of an older version (it does not say what was shown): not accepted")
        return fields

    def shown_groups(self, fields: dict) -> list[list[bytes]]:
        """The item tags of each group the answer showed."""
        raw, out, at = _unb64(fields["s"]), [], 0
        for n in fields["g"]:
            out.append([raw[4 * j:4 * j + 4] for j in range(at, at + n)])
            at += n
        return out


def bound_feedback(signer: ImpressionSigner, imp: dict, event, list_prices: list[float], now_us: int) -> Optional[tuple[str, str]]:
    """Whether one feedback event matches what its impression showed: None, or (field, reason) of the
    first mismatch. ``event``: a :class:`bundlerec.serving.schemas.FeedbackEvent`; ``list_prices``:
    the catalog price of each item it names (-1 or 0 where unknown)."""
    age_s = (now_us - int(imp["t"])) / 1e6
    if age_s > IMPRESSION_TTL_S:
        return "impression_id", f"the answer is {age_s / 86400:.0f} days old (feedback is taken for {IMPRESSION_TTL_S // 86400} days)"
    if event.event_time is not None:
        t_us = event.event_time.timestamp() * 1e6
        if t_us < int(imp["t"]) - CLOCK_SKEW_S * 1e6:
            return "event_time", "before the answer it is feedback on was issued"
    groups = signer.shown_groups(imp)
    if event.type == "bundle_accept":
        if imp["p"] != "bundles":
            return "type", "bundle_accept is feedback on a /v1/bundles answer"
        if event.bundle_index >= len(groups):
            return "bundle_index", f"the answer showed {len(groups)} bundle(s)"
        if sorted(signer.item_tag(x) for x in event.items) != sorted(groups[event.bundle_index]):
            return "items", "not the items of that bundle of the answer"
    else:
        if signer.item_tag(event.item_id) not in {t for g in groups for t in g}:
            return "item_id", "not an item the answer showed"
    if event.price is not None:
        cap = PRICE_CAP * sum(max(p, 0.0) for p in list_prices)
        if cap > 0 and event.price > cap:
            return "price", f"above {PRICE_CAP:g} times the catalog price"
    return None


@dataclass
class Experiment:
    """A running experiment as one replica holds it: the registry spec (arm -> version resolved)
    and each arm's loaded, checked model (bundlerec.serving.loading.Loaded)."""

    spec: dict
    arms: dict

    @property
    def name(self) -> str:
        return self.spec["name"]

    def route(self, unit: str):
        arm = assign(self.spec, unit)
        return arm, self.arms[arm]

    def pricing(self, arm: str) -> Optional[dict]:
        """The arm's pricing policy (bundlerec.config.check_price_policy), or None."""
        return self.spec["arms"][arm].get("pricing")
