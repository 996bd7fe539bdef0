"""The prep stage: raw clickstream -> validated events -> sessions -> split examples + tokenized items.

Output layout under ``data.output_dir``::

    items/              tokenized catalog (item_idx, item_id, text fields, input_ids, attention_mask)
    examples/{train,val,test,latest}/   Parquet shards (see bundlerec.data.sessionize)
    quarantine/events/  rejected rows with quarantine_reason and the raw source row
    manifest.json       row counts, quarantine counts, schema hash, model/tokenizer id, config
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from bundlerec.config import PipelineConfig, to_dict
from bundlerec.data import catalog as catalog_lib
from bundlerec.data.examples import EXAMPLE_ARROW
from bundlerec.data.readers import read_dataset
from bundlerec.data.sessionize import SPLITS, build_examples
from bundlerec.storage import join, reset_dir, write_text
from bundlerec.data.validate import KEPT_COLUMNS, REASON_COL, mark_duplicates, normalize_events, summarize, tagged_schema

log = logging.getLogger(__name__)


class PrepError(RuntimeError):
    """Prep refused the input (too many bad rows, no usable examples, ...)."""


def _examples_udf(batch: pd.DataFrame, **kw) -> pa.Table:
    """Tagged rows of whole users -> examples (quarantined rows are skipped)."""
    df = build_examples(batch.loc[batch[REASON_COL].isna(), list(KEPT_COLUMNS)], **kw)
    return pa.Table.from_pandas(df, schema=EXAMPLE_ARROW, preserve_index=False)


def _tag(batch: pd.DataFrame, **kw) -> pa.Table:
    return pa.Table.from_pandas(normalize_events(batch, **kw), schema=tagged_schema(), preserve_index=False)


def _dedupe(batch: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(mark_duplicates(batch), schema=tagged_schema(), preserve_index=False)


def _quarantined(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch[REASON_COL]))


def _split_rows(batch: pa.Table, split: str) -> pa.Table:
    return batch.filter(pc.equal(batch["split"], split))


def _good(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch[REASON_COL])).select(list(KEPT_COLUMNS))


def run_prep(cfg: PipelineConfig) -> dict:
    """Run prep on the current Ray cluster; returns the manifest (also written to manifest.json).
    Ray Data's own progress is on while it runs: bars on a terminal, a line per operator every 10 s
    (RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL) in `ray job logs`."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    shown, ctx.enable_progress_bars = ctx.enable_progress_bars, True
    try:
        return _run_prep(cfg)
    finally:
        ctx.enable_progress_bars = shown


def _run_prep(cfg: PipelineConfig) -> dict:
    import ray.data

    t0 = time.time()
    d = cfg.data
    out = d.output_dir
    events_path, catalog_path = d.events, d.catalog
    synthetic = None
    if events_path is None:
        from bundlerec.data.synthetic import generate

        raw_dir = join(out, "raw")
        reset_dir(raw_dir)
        synthetic = generate(d.synthetic, raw_dir)
        events_path, catalog_path = join(raw_dir, "events"), join(raw_dir, "catalog.parquet")
        log.info("prep: generated synthetic clickstream: %s", synthetic)

    # ---- catalog (small: collected to the driver for the id -> index map)
    catalog_counts: dict = {}
    catalog = None
    if catalog_path is not None:
        raw_catalog = read_dataset(catalog_path, "auto", encoding=d.encoding, delimiter=d.csv_delimiter).to_pandas()
        if d.catalog_layout == "long":  # (item, property, value) rows -> one row per item
            raw_catalog, catalog_columns = catalog_lib.pivot_properties(raw_catalog, d.catalog_columns,
                                                                        d.catalog_properties), {}
        else:
            catalog_columns = d.catalog_columns
        catalog, catalog_counts = catalog_lib.normalize_catalog(raw_catalog, catalog_columns)
        log.info("prep: catalog %d items from %s", len(catalog), catalog_path)

    # ---- validate: every row is kept or quarantined with a reason. Then one shuffle brings all rows
    # of a user into one block: duplicates across files are caught there, and sessionization below
    # reads the same blocks.
    raw = read_dataset(events_path, d.format, encoding=d.encoding, delimiter=d.csv_delimiter,
                       include_paths=bool(d.event_type_by_file))
    tagged = raw.map_batches(
        _tag, batch_format="pandas", batch_size=None,  # a block at a time: files may differ in columns
        fn_kwargs=dict(columns=d.columns, event_type_map=d.event_type_map, time_unit=d.time_unit,
                       event_type_constant=d.event_type_constant, event_type_by_file=d.event_type_by_file,
                       catalog_ids=catalog_lib.catalog_ids(catalog), max_price=d.max_price,
                       max_time=pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=d.max_future_skew_hours)),
    ).repartition(d.num_shards, keys=["user_id"]).map_batches(
        _dedupe, batch_format="pandas", batch_size=None).materialize()
    n_input = tagged.count()
    bad = tagged.map_batches(_quarantined, batch_format="pyarrow")
    bad_reasons = bad.select_columns([REASON_COL]).to_pandas()
    reasons = {} if bad_reasons.empty else {
        str(k): int(v) for k, v in bad_reasons[REASON_COL].value_counts().items()}
    quarantine_dir = join(out, "quarantine", "events")
    reset_dir(quarantine_dir)
    if reasons:
        bad.write_parquet(quarantine_dir)
    q = summarize(reasons, n_input, d.max_bad_fraction)
    q["path"] = quarantine_dir
    log.info("prep: %d input rows, %d quarantined %s", n_input, q["quarantined"], q["by_reason"])
    if q["bad_fraction"] > d.max_bad_fraction:
        raise PrepError(
            f"{q['bad_fraction']:.1%} of {n_input} event rows are invalid (limit data.max_bad_fraction="
            f"{d.max_bad_fraction:.1%}): {q['by_reason']}. The rows are kept in {quarantine_dir} with a "
            f"quarantine_reason; fix the input or the column mapping (data.columns / data.event_type_map).")
    good = tagged.map_batches(_good, batch_format="pyarrow")
    n_good = good.count()
    if n_good == 0:
        raise PrepError(f"no valid events in {events_path}; quarantine: {q['by_reason']}")

    if catalog is None:
        catalog = catalog_lib.from_events(good.select_columns(
            ["event_time", "item_id", "title", "category", "brand", "price"]).to_pandas())
        log.info("prep: derived a catalog of %d items from the event columns", len(catalog))

    # ---- items: text + tokenization in map_batches
    items_dir = join(out, "items")
    reset_dir(items_dir)
    items = ray.data.from_pandas(catalog).map_batches(
        catalog_lib.tokenize_batch, batch_format="pandas", batch_size=4096,
        fn_kwargs={"model_name": cfg.model.name_or_path, "max_tokens": d.item_max_tokens})
    items.repartition(1).write_parquet(items_dir)

    # ---- sessions -> sequences -> split examples (all rows of a user in one block, see above)
    index = catalog_lib.item_lookup(catalog)
    examples = tagged.map_batches(
        _examples_udf, batch_format="pandas", batch_size=None,
        fn_kwargs=dict(item_index=index, gap_minutes=d.session_gap_minutes, history_len=d.max_history_len,
                       target_event=d.target_event, val_baskets=d.val_baskets,
                       test_baskets=d.test_baskets)).materialize()
    counts = {}
    for split in SPLITS:
        split_dir = join(out, "examples", split)
        reset_dir(split_dir)
        part = examples.map_batches(_split_rows, batch_format="pyarrow", fn_kwargs={"split": split})
        part.write_parquet(split_dir)
        counts[split] = part.count()
    latest = examples.select_columns(["n_sessions"]).sum("n_sessions")
    if counts["train"] == 0 or counts["test"] == 0:
        raise PrepError(f"not enough baskets to train and test: {counts}. Users need >= 2 sessions with a "
                        f"'{d.target_event}' event (data.target_event).")
    if counts["val"] == 0:
        log.warning("prep: no validation examples (data.val_baskets=%d): training and promotion will refuse "
                    "this output, since they select on validation only", d.val_baskets)

    schema_str = json.dumps({"examples": str(EXAMPLE_ARROW), "items": str(items.schema())}, sort_keys=True)
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(),
        "events_path": events_path, "catalog_path": catalog_path, "synthetic": synthetic,
        "rows": {"input": n_input, "kept": n_good, "quarantined": q["quarantined"]},
        "quarantine": q, "catalog": {"items": len(catalog), **catalog_counts},
        "sessions": int(latest or 0), "users": counts["latest"],
        "examples": counts,
        "schema_hash": hashlib.sha256(schema_str.encode()).hexdigest()[:16],
        "model": cfg.model.name_or_path, "tokenizer": cfg.model.name_or_path,
        "item_max_tokens": d.item_max_tokens, "max_history_len": d.max_history_len,
        "config": to_dict(d),
        "seconds": round(time.time() - t0, 2),
    }
    write_text(join(out, "manifest.json"), json.dumps(manifest, indent=2, default=str))
    log.info("prep: done in %.1fs: %s", manifest["seconds"], counts)
    return manifest
