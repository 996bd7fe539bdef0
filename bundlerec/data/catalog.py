"""The item catalog: loading, deriving it from event columns, item text and its tokenization.

Items get a dense index ``item_idx`` (0..N-1, sorted by ``item_id``) used by examples, the model
and the item-embedding index. Tokenization runs once per item in Ray Data ``map_batches``; training
never tokenizes per step.
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from bundlerec.data.schema import REQUIRED_CATALOG_COLUMNS, SchemaError, clean_id, item_text, rename_columns
from bundlerec.data.validate import as_json

ITEM_COLUMNS = ["item_idx", "item_id", "title", "category", "brand", "price", "text"]


def _text(col: pd.Series, sep: str) -> pd.Series:
    """Text of a catalog column; list values (Amazon's category paths, description paragraphs) joined."""
    def one(v):
        if isinstance(v, (list, tuple, np.ndarray)):
            parts = [str(x).strip() for x in v if x is not None and str(x).strip()]
            return sep.join(parts) if parts else None
        return v

    return col.map(one).astype("string") if col.dtype == object else col.astype("string")


def parse_price(col: pd.Series) -> pd.Series:
    """Prices as numbers: numeric columns as they are; text like "$1,299.00", "EUR 12,5" or RetailRocket's
    "n552.000" by its first number ("$12.99 - $15.99" -> 12.99); anything else NaN."""
    if pd.api.types.is_numeric_dtype(col):
        return pd.to_numeric(col, errors="coerce").astype("float64")
    s = col.astype("string").str.replace(r"(?<=\d),(?=\d{3}(?!\d))", "", regex=True)  # thousands separators
    s = s.str.replace(r"(?<=\d),(?=\d{1,2}(?!\d))", ".", regex=True)  # decimal comma
    num = pd.to_numeric(s.str.extract(r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", expand=False), errors="coerce")
    word = s.str.strip().str.lower()  # "inf" spelled out is an infinite price (quarantined), not a missing one
    num = num.mask(word.isin(["inf", "+inf", "infinity"]), np.inf).mask(word.isin(["-inf", "-infinity"]), -np.inf)
    return num.astype("float64")


def pivot_properties(raw: pd.DataFrame, columns: dict, properties: dict, max_other: int = 12) -> pd.DataFrame:
    """A long catalog -- one row per (item, property, value[, time]), RetailRocket's item_properties --
    as one row per item: the latest value of each property; ``properties`` (canonical -> property)
    become columns, up to ``max_other`` other properties go into the description as property=value."""
    col = {c: columns.get(c, c) for c in ("item_id", "property", "value", "time")}
    missing = [f"{c} ({src})" for c, src in col.items() if src not in raw.columns and c != "time"]
    if missing:
        raise SchemaError(f"catalog (long layout): missing column(s) {missing}; found {sorted(map(str, raw.columns))}. "
                          "Map them with data.catalog_columns.item_id/property/value/time")
    df = pd.DataFrame({"item_id": clean_id(raw[col["item_id"]]), "property": raw[col["property"]].astype("string"),
                       "value": raw[col["value"]].astype("string")})
    if col["time"] in raw.columns:
        df["t"] = pd.to_numeric(raw[col["time"]], errors="coerce")
        df = df.sort_values("t", kind="stable")
    latest = df.dropna(subset=["item_id", "property"]).drop_duplicates(["item_id", "property"], keep="last")
    wide = latest.pivot(index="item_id", columns="property", values="value")
    out = pd.DataFrame(index=wide.index)
    for canon, prop in properties.items():
        out[canon] = wide[str(prop)] if str(prop) in wide.columns else pd.NA
    others = sorted(c for c in wide.columns if c not in {str(p) for p in properties.values()})[:max_other]
    extra = wide[others].apply(lambda r: " ".join(f"{k}={v}" for k, v in r.items() if pd.notna(v)), axis=1) \
        if others else pd.Series("", index=wide.index)
    desc = out["description"].astype("string") if "description" in out else pd.Series(pd.NA, index=out.index,
                                                                                         dtype="string")
    out["description"] = (desc.fillna("") + " " + extra.astype("string")).str.strip().replace("", pd.NA)
    return out.reset_index().rename(columns={"index": "item_id"})


def normalize_catalog(raw: pd.DataFrame, columns: dict, max_price: float = float("inf")
                      ) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """Canonical catalog, counts, and the rows set aside with their reason and raw row (JSON):
    missing id, duplicate id (the last row of an id wins), a price that is infinite, negative or
    above ``max_price``. Every input row is in exactly one of the two tables."""
    df = rename_columns(raw.copy(), columns, REQUIRED_CATALOG_COLUMNS, "catalog")
    out = pd.DataFrame({"item_id": clean_id(df["item_id"])})
    for c, sep in (("title", " "), ("category", " > "), ("brand", " "), ("description", " ")):
        out[c] = _text(df[c], sep) if c in df else pd.Series(pd.NA, index=df.index, dtype="string")
    out["price"] = parse_price(df["price"]) if "price" in df else np.nan
    out["cost"] = parse_price(df["cost"]) if "cost" in df else np.nan
    reason = pd.Series(pd.NA, index=out.index, dtype="string")
    price_bad = out.price.notna() & ~((out.price >= 0) & (out.price <= max_price))  # inf, negative, implausible
    reason[price_bad] = "catalog_bad_price"
    reason[out.item_id.isna()] = "catalog_missing_item_id"
    dup = out.item_id.notna() & reason.isna() & out.item_id.where(reason.isna()).duplicated(keep="last")
    reason[dup] = "catalog_duplicate_item_id"
    counts = {"catalog_missing_item_id": int((reason == "catalog_missing_item_id").sum()),
              "catalog_duplicate_item_id": int((reason == "catalog_duplicate_item_id").sum()),
              "catalog_bad_price": int((reason == "catalog_bad_price").sum())}
    bad = reason.notna()
    rejected = pd.DataFrame({"quarantine_reason": reason[bad].astype(str),
                             "raw": [json.dumps({k: as_json(v) for k, v in r.items()})
                                     for r in raw[bad.to_numpy()].to_dict("records")]})
    return finalize(out[~bad]), counts, rejected


def from_events(events: pd.DataFrame) -> pd.DataFrame:
    """Derive a catalog from item columns carried by events (REES46-style logs): latest values win."""
    df = events.sort_values("event_time", kind="stable").groupby("item_id", sort=False).agg(
        title=("title", "last"), category=("category", "last"), brand=("brand", "last"),
        price=("price", "last")).reset_index()
    df["description"] = pd.NA
    return finalize(df)


def finalize(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values("item_id").reset_index(drop=True)
    df["cost"] = pd.to_numeric(df["cost"], errors="coerce").astype("float64") if "cost" in df else np.nan
    title = df["title"].astype("string")
    fallback = (df["brand"].fillna("").astype("string") + " " +
                df["category"].fillna("").astype("string").str.replace(".", " ", regex=False)).str.strip()
    df["title"] = title.fillna(fallback).mask(lambda s: s.fillna("") == "", "item " + df["item_id"])
    df["item_idx"] = np.arange(len(df), dtype=np.int64)
    df["text"] = [item_text(t, c, b, p, d) for t, c, b, p, d in
                  zip(df.title, df.category.astype(object), df.brand.astype(object), df.price,
                      df["description"].astype(object) if "description" in df else [None] * len(df))]
    return df[ITEM_COLUMNS + ["cost", "description"]]


@functools.lru_cache(maxsize=4)
def _tokenizer(model_name: str):
    from bundlerec.hub import load_tokenizer

    return load_tokenizer(model_name)


def pad_id(tok) -> int:
    """The id padding uses: the tokenizer's pad token, else its end-of-text token (decoder LLMs often
    have no pad token), else 0. Padded positions are masked; the id only has to be a real token."""
    for t in (tok.pad_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def tokenizer_fingerprint(tok) -> dict:
    """What makes token ids mean the same thing: the vocabulary (SHA-256 of its token -> id pairs),
    the special tokens and the pad id. Prep records it; training refuses a model whose tokenizer
    differs (the ids would index other embeddings)."""
    import hashlib
    import json

    vocab = json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    specials = json.dumps(tok.special_tokens_map, sort_keys=True, default=str)
    return {"class": type(tok).__name__, "vocab_size": len(tok), "pad_token_id": pad_id(tok),
            "sha256": hashlib.sha256((vocab + specials).encode()).hexdigest()[:16]}


def tokenize_batch(batch: pd.DataFrame, model_name: str, max_tokens: int) -> pa.Table:
    """Ray Data UDF: item text -> input_ids / attention_mask (unpadded lists)."""
    tok = _tokenizer(model_name)
    enc = tok(batch["text"].tolist(), truncation=True, max_length=max_tokens, padding=False)
    table = pa.Table.from_pandas(batch.drop(columns=["description"], errors="ignore"), preserve_index=False)
    return (table.append_column("input_ids", pa.array(enc["input_ids"], pa.list_(pa.int64())))
                 .append_column("attention_mask", pa.array(enc["attention_mask"], pa.list_(pa.int64()))))


def padded_tokens(items: pd.DataFrame, pad_id: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack tokenized items into (N, L) int64 arrays padded (right) to the longest item, with the
    tokenizer's pad id (recorded by prep, :func:`load_items` carries it; 0 for older preps)."""
    pad_id = items.attrs.get("pad_token_id", 0) if pad_id is None else pad_id
    lengths = items["input_ids"].map(len).to_numpy()
    L = int(lengths.max()) if len(lengths) else 1
    ids = np.full((len(items), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(items), L), dtype=np.int64)
    for i, (seq, n) in enumerate(zip(items["input_ids"], lengths)):
        ids[i, :n] = seq
        mask[i, :n] = 1
    return ids, mask


def load_items(prep_dir: str) -> pd.DataFrame:
    """The tokenized catalog written by prep, ordered by item_idx."""
    import pyarrow.parquet as pq

    from bundlerec.storage import join

    from bundlerec.data.snapshot import data_root

    import json

    from bundlerec.storage import read_text

    items = pq.read_table(join(data_root(prep_dir), "items")).to_pandas().sort_values("item_idx").reset_index(drop=True)
    try:
        manifest = json.loads(read_text(join(prep_dir, "manifest.json")))
    except FileNotFoundError:  # a prep-format folder without manifest (jobs.eval_bundles)
        manifest = {}
    items.attrs["pad_token_id"] = manifest.get("tokenizer_fingerprint", {}).get("pad_token_id", 0)
    return items


def item_lookup(items: pd.DataFrame) -> dict:
    return dict(zip(items.item_id, items.item_idx))


def catalog_ids(catalog: Optional[pd.DataFrame]) -> Optional[pd.Index]:
    return None if catalog is None else pd.Index(catalog.item_id.astype(str))
