"""The one clickstream schema, read by data prep, the model input layer and (later) the Serve validator.

Events (one row per interaction)::

    event_time   timestamp (UTC)   when it happened; ISO strings or unix numbers are parsed
    event_type   string            view | click | cart | purchase
    user_id      string            the shopper
    session_id   string, optional  the source's own session id (sessions also split on inactivity)
    item_id      string            the product
    price        float, optional   price paid / shown (>= 0)
    quantity     int, optional     units (purchases)

Catalog (one row per item)::

    item_id, title, category, brand, price, description (optional), cost (optional: unit cost, the
    floor of a bundle's price under ``min_margin``)

Foreign logs load through a column mapping (canonical -> source column) and an event-type map;
e.g. REES46 (``event_time, event_type, product_id, category_code, brand, price, user_id,
user_session``) needs ``columns: {item_id: product_id, session_id: user_session}`` and, with no
separate catalog file, the catalog is derived from ``category_code``/``brand``/``price``.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase")
"""Canonical event types; their index is the model's event-type id."""
EVENT_TYPE_ID = {t: i for i, t in enumerate(EVENT_TYPES)}

EVENT_COLUMNS = ("event_time", "event_type", "user_id", "session_id", "item_id", "price", "quantity")
REQUIRED_EVENT_COLUMNS = ("event_time", "event_type", "user_id", "item_id")
CATALOG_COLUMNS = ("item_id", "title", "category", "brand", "price", "description", "cost")
REQUIRED_CATALOG_COLUMNS = ("item_id",)

# Quarantine reasons, in the order they are checked (a row gets the first that applies).
REASONS = (
    "missing_user_id",
    "missing_item_id",
    "unparseable_time",
    "unknown_event_type",
    "negative_price",
    "item_not_in_catalog",
)

# Common aliases understood without configuration (source name -> canonical name).
DEFAULT_ALIASES = {
    "product_id": "item_id",
    "user_session": "session_id",
    "category_code": "category",
    "timestamp": "event_time",
}

# Output schemas (Arrow type strings) hashed into the manifest so consumers can detect drift.
EXAMPLE_SCHEMA = {
    "user_id": "string",
    "split": "string",
    "target_time": "timestamp[us, tz=UTC]",
    "targets": "list<int64>",
    "hist_items": "list<int64>",
    "hist_types": "list<int64>",
    "hist_age_hours": "list<double>",
}
ITEM_SCHEMA = {
    "item_idx": "int64",
    "item_id": "string",
    "title": "string",
    "category": "string",
    "brand": "string",
    "price": "double",
    "text": "string",
    "cost": "double",
    "input_ids": "list<int64>",
    "attention_mask": "list<int64>",
}


class SchemaError(ValueError):
    """Input data does not match the schema (names the file/column and how to fix it)."""


def rename_columns(df: pd.DataFrame, mapping: dict, required: tuple[str, ...], what: str) -> pd.DataFrame:
    """Rename source columns to canonical names; fail clearly on missing required columns."""
    rename = {src: canon for canon, src in mapping.items() if src in df.columns}
    for src, canon in DEFAULT_ALIASES.items():
        if src in df.columns and canon not in df.columns and canon not in rename.values() \
                and src not in mapping.values():
            rename[src] = canon
    df = df.rename(columns=rename)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SchemaError(
            f"{what}: missing required column(s) {missing}; found {sorted(map(str, df.columns))}. "
            f"Map them in the config, e.g. data.columns.{missing[0]}=<source column>")
    return df


def parse_time(col: pd.Series, unit: str = "s") -> pd.Series:
    """Parse event times to UTC timestamps; unparseable values become NaT (then quarantined)."""
    if pd.api.types.is_datetime64_any_dtype(col):
        out = pd.to_datetime(col, utc=True)
    elif pd.api.types.is_numeric_dtype(col):
        out = pd.to_datetime(col, unit=unit, utc=True, errors="coerce")
    else:
        s = col.astype("string").str.strip().str.replace(r"\s+UTC$", "+00:00", regex=True)
        numeric = pd.to_numeric(s, errors="coerce")
        out = pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601")
        num_mask = numeric.notna() & out.isna()
        if num_mask.any():
            out = out.where(~num_mask, pd.to_datetime(numeric[num_mask], unit=unit, utc=True, errors="coerce"))
    return out.astype("datetime64[us, UTC]")


def clean_id(col: pd.Series) -> pd.Series:
    """IDs are strings; empty strings and nulls become <NA>; integral floats lose their '.0'."""
    if pd.api.types.is_float_dtype(col):
        col = col.map(lambda v: None if pd.isna(v) else (str(int(v)) if float(v).is_integer() else str(v)))
    s = col.astype("string").str.strip()
    return s.mask(s == "")


def _present(v) -> bool:
    try:
        return v is not None and not pd.isna(v) and str(v) != ""
    except (TypeError, ValueError):  # list-like values
        return True


def item_text(title, category, brand, price, description=None) -> str:
    """The text the item tower reads. One function, used by prep, evaluation and serving.

    ``title | category: a > b > leaf | brand: x | price: 9.99 | description`` with HTML entities
    unescaped; the description comes last, so the tokenizer's length limit cuts it first."""
    parts = [html.unescape(str(title)) if _present(title) else ""]
    if _present(category):
        parts.append(f"category: {str(category).replace('.', ' > ')}")
    if _present(brand):
        parts.append(f"brand: {brand}")
    if _present(price) and np.isfinite(float(price)) and float(price) >= 0:
        parts.append(f"price: {float(price):.2f}")
    if _present(description):
        parts.append(html.unescape(" ".join(str(description).split())))
    return " | ".join(p for p in parts if p)
