"""Feedback idempotency across replicas: one Ray actor per Serve application holds the (impression,
event) keys every replica has accepted, so the same event posted twice is counted once whichever
replicas the two requests reach (before, each replica only knew its own keys).

A replica claims a request's new events in one call before it appends their rows, each event as the
group of its keys (its (impression, event) key and the purchase key of each item it buys); the actor
answers which groups hold no key claimed before and records those, so two replicas racing on one key
get one yes.
When the append then fails, the replica releases its keys (nothing was recorded; the client retries).
The actor is detached (it outlives replica restarts and redeploys) and bounded (the oldest keys are
dropped beyond ``capacity``: 16-byte digests, about 150 MB at a million). When it cannot be reached the
replica falls back to its own keys and says so in its health; the experiment report de-duplicates
again over the whole log."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Optional

import ray

log = logging.getLogger("ray.serve")

CAPACITY = 1_000_000
CALL_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 30.0
"""How long a replica waits at start for the actor (created by the first replica) to answer."""


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class FeedbackKeys:
    """The accepted keys of one Serve application (see the module docstring)."""

    def __init__(self, capacity: int = CAPACITY):
        self.capacity, self.keys = int(capacity), OrderedDict()

    def claim(self, groups: list[list[bytes]]) -> list[bool]:
        """For each group of keys (one event): True if none of them was claimed before (all are now
        recorded), False for a duplicate (nothing of it recorded)."""
        out = []
        for g in groups:
            fresh = not any(k in self.keys for k in g)
            if fresh:
                for k in g:
                    self.keys[k] = None
            out.append(fresh)
        while len(self.keys) > self.capacity:
            self.keys.popitem(last=False)
        return out

    def release(self, keys: list[bytes]) -> None:
        """Forget keys whose rows were not recorded after all (the append failed)."""
        for k in keys:
            self.keys.pop(k, None)

    def size(self) -> int:
        return len(self.keys)


class SharedKeys:
    """A replica's handle on its application's :class:`FeedbackKeys` (created by the first replica)."""

    def __init__(self, app_name: str, capacity: int = CAPACITY, ready_timeout_s: float = READY_TIMEOUT_S):
        self.name = f"bundlerec-feedback-keys:{app_name}"
        self.actor = FeedbackKeys.options(name=self.name, lifetime="detached", get_if_exists=True).remote(capacity)
        self.last_error: Optional[str] = None
        try:  # a new actor's process starts in seconds on a busy node: longer than one claim may wait
            ray.get(self.actor.size.remote(), timeout=ready_timeout_s)
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            log.warning("bundlerec: the shared feedback keys are not up yet (this replica's own keys decide): %s", e)

    def claim(self, groups: list[list[bytes]]) -> Optional[list[bool]]:
        """:meth:`FeedbackKeys.claim`, or None when the actor cannot answer in time (the caller then
        relies on its own keys)."""
        try:
            out = ray.get(self.actor.claim.remote(groups), timeout=CALL_TIMEOUT_S)
            self.last_error = None
            return out
        except Exception as e:  # GetTimeoutError, RayActorError while it restarts, ...
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            log.warning("bundlerec: the shared feedback keys did not answer (this replica's own keys decide): %s", e)
            return None

    def release(self, keys: list[bytes]) -> None:
        try:
            ray.get(self.actor.release.remote(keys), timeout=CALL_TIMEOUT_S)
        except Exception as e:
            log.warning("bundlerec: could not release feedback keys: %s", e)
