"""Feedback events (``POST /v1/feedback``) checked against the impression they answer and turned into
event-log rows: the impression id must be this deployment's, the items in the catalog and exactly
what the answer showed (items, endpoint, bundle, time, price); a bundle's price is split over its
items in proportion to their list prices. An event is recorded once (its (impression_id, event_id)
key), and a shown item is bought at most once per answer (a purchase or an accepted bundle holding
it, whatever the event id: its (impression_id, item_id) purchase key); a repeat of either is counted
as a duplicate, not recorded."""

import hashlib
from typing import Callable

from fastapi.exceptions import RequestValidationError

from bundlerec.experiments.assignment import bound_feedback
from bundlerec.serving.schemas import FEEDBACK_EVENT_TYPE


def feedback_key(impression_id: str, event_id: str) -> bytes:
    """The idempotency key of one event: a 16-byte digest of (impression_id, event_id)."""
    return hashlib.blake2b(f"{impression_id}|{event_id}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


def purchase_key(impression_id: str, item_id: str) -> bytes:
    """The key of one shown item bought on one answer (a separate digest space from event keys)."""
    return hashlib.blake2b(f"{impression_id}|{item_id}".encode("utf-8", "surrogatepass"), digest_size=16,
                           person=b"bundlerec-buy").digest()


def _refuse(i: int, field: str, msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", "events", i, field), "msg": msg, "type": "value_error"}])


def feedback_rows(events: list, signer, rec, was_seen: Callable[[bytes], bool], now: int) -> tuple[list, int]:
    """([(keys, rows) of each new event], duplicates skipped) for a request's events: an event's keys
    are its idempotency key and, for a purchase or an accepted bundle, the purchase key of each of its
    items; it is new when none of them was recorded before (here or earlier in the request). Every
    event is checked before anything is returned (the first bad one raises a 422 naming it).

    Args:
        events: the request's ``FeedbackEvent`` objects.
        signer: the replica's ``ImpressionSigner``.
        rec: the serving ``Recommender`` (catalog positions and list prices).
        was_seen: whether a key was recorded before (this replica).
        now: the receive time in microseconds since the epoch.
    """
    out, taken, dup = [], set(), 0
    for i, e in enumerate(events):
        try:
            imp = signer.check(e.impression_id)
        except ValueError as err:
            raise _refuse(i, "impression_id", str(err)) from None
        items = e.items if e.type == "bundle_accept" else [e.item_id]
        unknown = [x for x in items if x not in rec.item_pos]
        if unknown:
            raise _refuse(i, "items" if e.type == "bundle_accept" else "item_id", f"not in the catalog: {unknown[:5]}")
        wrong = bound_feedback(signer, imp, e, [float(rec.prices[rec.item_pos[x]]) for x in items], now)
        if wrong:
            raise _refuse(i, wrong[0], wrong[1])
        kind = FEEDBACK_EVENT_TYPE[e.type]
        keys = [feedback_key(e.impression_id, e.event_id)]
        if kind == "purchase":
            keys += [purchase_key(e.impression_id, x) for x in items]
        if any(k in taken or was_seen(k) for k in keys):
            dup += 1
            continue
        taken.update(keys)
        list_prices = [max(rec.prices[rec.item_pos[x]], 0.0) for x in items]
        if e.type == "bundle_accept":
            total = sum(list_prices)
            paid = [e.price * (p / total if total > 0 else 1 / len(items)) for p in list_prices]
        else:
            paid = [e.price if e.price is not None else list_prices[0]]
        t = int(e.event_time.timestamp() * 1e6) if e.event_time else now
        rows = []
        for x, p in zip(items, paid):
            rows.append({"event_time": t, "event_type": kind, "user_id": imp["u"],
                         "session_id": imp["u"] if imp["u"].startswith("anon-") else None, "item_id": x,
                         "price": round(p, 4), "quantity": e.quantity, "impression_id": e.impression_id,
                         "event_id": e.event_id, "feedback_type": e.type, "experiment": imp["e"], "arm": imp["a"],
                         "model_version": imp["v"], "bundle_index": e.bundle_index,
                         "revenue": round(p * e.quantity, 4) if kind == "purchase" else 0.0, "received_time": now})
        out.append((keys, rows))
    return out, dup
