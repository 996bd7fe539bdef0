"""Validation: every input row is either kept (typed, canonical) or quarantined with a reason.

Nothing is dropped silently: ``kept + quarantined == input`` always. Quarantined rows keep their
original values (``raw`` holds the source row as JSON) and are written beside the prep output.
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
import pandas as pd

from bundlerec.data.schema import EVENT_TYPES, REQUIRED_EVENT_COLUMNS, SchemaError, clean_id, parse_time, rename_columns

REASON_COL = "quarantine_reason"
# Not an error, but not an interaction we model (e.g. REES46 remove_from_cart mapped to null):
# quarantined for the record, excluded from the bad-row fraction.
IGNORED = "ignored_event_type"
EXTRA_ITEM_COLUMNS = ("title", "category", "brand")

KEPT_COLUMNS = ("event_time", "event_type", "user_id", "session_id", "item_id", "price", "quantity",
                *EXTRA_ITEM_COLUMNS)


def tagged_schema():
    """Arrow schema of normalize_events' output: fixed, so every block (even an all-null one) agrees."""
    import pyarrow as pa

    s = pa.string()
    return pa.schema([("event_time", pa.timestamp("us", tz="UTC")), ("event_type", s), ("user_id", s),
                      ("session_id", s), ("item_id", s), ("price", pa.float64()), ("quantity", pa.float64()),
                      ("title", s), ("category", s), ("brand", s), (REASON_COL, s), ("raw", s)])


DUPLICATE = "duplicate_event"
DUPLICATE_KEY = ["user_id", "item_id", "event_type", "event_time", "session_id"]


def duplicate_mask(events: pd.DataFrame, good: np.ndarray) -> np.ndarray:
    """Rows that repeat an earlier good row's (user, item, type, time, session): double-logging,
    replayed batches, a file ingested twice. The first copy is the one kept."""
    dup = np.zeros(len(events), dtype=bool)
    dup[good] = events.loc[good, DUPLICATE_KEY].duplicated(keep="first").to_numpy()
    return dup


def mark_duplicates(tagged: pd.DataFrame) -> pd.DataFrame:
    """Quarantine duplicates among still-good tagged rows (``raw`` gets the canonical row as JSON).
    Prep calls it on blocks that hold all rows of their users, so copies in different files count."""
    good = tagged[REASON_COL].isna().to_numpy()
    dup = duplicate_mask(tagged, good)
    if dup.any():
        tagged = tagged.copy()
        tagged.loc[dup, REASON_COL] = DUPLICATE
        tagged.loc[dup, "raw"] = [json.dumps({k: as_json(v) for k, v in rec.items()})
                                  for rec in tagged.loc[dup, list(KEPT_COLUMNS)].to_dict("records")]
    return tagged


MAX_ID_CHARS = 128  # ids longer than this are not ids (the Serve API refuses them too)


def _missing(v) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # list-like values (a JSON array in the source row)
        return False


def as_json(v):
    """A raw cell as JSON: missing -> null, anything else its text (quarantined rows keep what came in)."""
    return None if _missing(v) else str(v)


def event_types_by_file(paths: pd.Series, by_file: dict) -> pd.Series:
    """The event type of each row from its file's name (the first glob of ``by_file`` that matches)."""
    import fnmatch
    import posixpath

    def kind(p):
        name = posixpath.basename(str(p))
        return next((t for g, t in by_file.items() if fnmatch.fnmatch(name, g) or fnmatch.fnmatch(str(p), g)), None)

    return paths.map(kind).astype("string")


def normalize_events(batch: pd.DataFrame, columns: dict, event_type_map: dict, time_unit: str,
                     catalog_ids: Optional[pd.Index], max_time: Optional[pd.Timestamp] = None,
                     max_price: float = float("inf"), event_type_constant: Optional[str] = None,
                     event_type_by_file: Optional[dict] = None, user_id_fallback: str = "none") -> pd.DataFrame:
    """Map a raw batch to the canonical event schema and tag each row with a quarantine reason.

    ``max_time``: events after it are clock skew (``future_time``); ``max_price``: larger prices are
    ``implausible_price``. A row gets the first reason that applies. ``user_id_fallback`` session:
    a row without a user id (or a log without a user column) keeps its session id as the user.

    Returns the canonical columns plus ``quarantine_reason`` (None for good rows) and ``raw``
    (the source row as JSON, only on quarantined rows).
    """
    source = batch.reset_index(drop=True)
    df = source.copy()
    if event_type_constant:  # e.g. every review is a purchase
        df["event_type"] = event_type_constant
    elif event_type_by_file:  # one file per type; read_dataset(include_paths=True) added "path"
        df["event_type"] = event_types_by_file(df["path"], event_type_by_file)
    by_session = user_id_fallback == "session"
    df = rename_columns(df, columns, tuple(c for c in REQUIRED_EVENT_COLUMNS if not (by_session and c == "user_id")),
                        "events")
    if by_session and "session_id" not in df:
        raise SchemaError("data.user_id_fallback=session needs a session column: map data.columns.session_id")
    n = len(df)
    out = pd.DataFrame(index=df.index)
    out["event_time"] = parse_time(df["event_time"], time_unit)
    et = df["event_type"].astype("string").str.strip().str.lower()
    mapping = {str(k).lower(): v for k, v in event_type_map.items()}
    mapped = et.map(lambda v: mapping.get(v, v) if v is not pd.NA else None)
    out["event_type"] = mapped.astype("string")
    out["user_id"] = clean_id(df["user_id"]) if "user_id" in df else pd.Series(pd.NA, index=df.index, dtype="string")
    out["session_id"] = clean_id(df["session_id"]) if "session_id" in df else pd.Series(pd.NA, index=df.index, dtype="string")
    if by_session:  # anonymous shoppers: the session is the user
        out["user_id"] = out["user_id"].fillna(out["session_id"])
    out["item_id"] = clean_id(df["item_id"])
    price = pd.to_numeric(df["price"], errors="coerce") if "price" in df else pd.Series(np.nan, index=df.index)
    out["price"] = price.astype("float64")
    qty = pd.to_numeric(df["quantity"], errors="coerce") if "quantity" in df else pd.Series(np.nan, index=df.index)
    out["quantity"] = qty.astype("float64")
    for c in EXTRA_ITEM_COLUMNS:
        out[c] = df[c].astype("string") if c in df else pd.Series(pd.NA, index=df.index, dtype="string")

    reason = np.full(n, None, dtype=object)

    def tag(mask, name):
        m = np.asarray(mask, dtype=bool) & (reason == None)  # noqa: E711 (elementwise)
        reason[m] = name

    tag(out["user_id"].isna(), "missing_user_id")
    tag(out["item_id"].isna(), "missing_item_id")
    tag((out["user_id"].str.len() > MAX_ID_CHARS).fillna(False) | (out["item_id"].str.len() > MAX_ID_CHARS).fillna(False),
        "id_too_long")
    tag(out["event_time"].isna(), "unparseable_time")
    if max_time is not None:
        tag((out["event_time"] > max_time).fillna(False), "future_time")
    explicitly_ignored = et.isin([k for k, v in mapping.items() if v is None]).fillna(False)
    tag(explicitly_ignored, IGNORED)
    tag(~out["event_type"].isin(EVENT_TYPES).fillna(False), "unknown_event_type")
    if "price" in df:
        raw_price = df["price"]
        unparseable = raw_price.notna() & (raw_price.astype("string").str.strip() != "") & price.isna()
        tag(unparseable, "unparseable_price")
        tag(price < 0, "negative_price")
        tag(~np.isfinite(price.fillna(0.0)), "unparseable_price")
        tag((price > max_price).fillna(False), "implausible_price")
    if catalog_ids is not None:
        tag(~out["item_id"].isin(catalog_ids).fillna(False), "item_not_in_catalog")
    # the same event logged twice inside this block; copies in other blocks or files are caught by
    # mark_duplicates once prep has brought all of a user's rows together
    tag(duplicate_mask(out, reason == None), DUPLICATE)  # noqa: E711 (elementwise)

    out[REASON_COL] = pd.Series(reason, dtype="string")
    bad = out[REASON_COL].notna().to_numpy()
    raw = pd.Series(pd.NA, index=df.index, dtype="string")
    if bad.any():
        raw[bad] = [json.dumps({str(k): as_json(v) for k, v in rec.items()}) for rec in source[bad].to_dict("records")]
    out["raw"] = raw
    return out


def summarize(reason_counts: dict, n_input: int, max_bad_fraction: float) -> dict:
    """Counts per reason and the bad fraction (ignored event types are not 'bad')."""
    n_bad = sum(v for k, v in reason_counts.items() if k != IGNORED)
    frac = n_bad / n_input if n_input else 0.0
    return {"input_rows": n_input, "quarantined": sum(reason_counts.values()),
            "by_reason": dict(sorted(reason_counts.items())), "bad_fraction": frac,
            "max_bad_fraction": max_bad_fraction}
