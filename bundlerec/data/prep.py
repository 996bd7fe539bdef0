"""The prep stage: raw clickstream -> validated events -> sessions -> split examples + tokenized items.

Output layout under ``data.output_dir`` (one snapshot per run, see bundlerec.data.snapshot)::

    manifest.json       the commit: row/basket/catalog counts, quarantine counts, input files (size,
                        SHA-256, skipped ones with why), every output file (size, SHA-256), schema
                        hash, model/tokenizer id, config, and the current snapshot
    snapshots/<id>/items/              tokenized catalog (item_idx, item_id, text fields, input_ids, attention_mask)
    snapshots/<id>/examples/{train,val,test,latest}/   Parquet shards (see bundlerec.data.sessionize)
    snapshots/<id>/quarantine/events/  rejected rows with quarantine_reason and the raw source row
    snapshots/<id>/quarantine/catalog/ rejected catalog rows (missing/duplicate id, bad price), same columns
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
from bundlerec.data.readers import expand, read_dataset
from bundlerec.data.sessionize import COLD, SPLITS, build_examples, global_cutoffs
from bundlerec.data.snapshot import commit, file_table, input_table, new_snapshot
from bundlerec.storage import is_uri, join, reset_dir, write_text
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


def _split_report(examples, mode: str, cutoffs: tuple[float, float] | None) -> dict:
    """What the split guarantees, measured: the cutoffs, and how many training examples lie after
    the test cutoff / the validation cutoff (0 for global_time; the per-user split's leak otherwise)."""
    from ray.data.expressions import col

    if cutoffs is None:
        return {"mode": mode}
    t = examples.filter(expr=col("split") == "train").select_columns(["target_time"]).to_pandas()["target_time"]
    ts = t.astype("datetime64[us, UTC]").astype("int64").to_numpy() / 1e6
    iso = lambda x: datetime.fromtimestamp(x, timezone.utc).isoformat()  # noqa: E731
    n = max(1, len(ts))
    return {"mode": mode, "val_cutoff": iso(cutoffs[0]), "test_cutoff": iso(cutoffs[1]), "train_examples": len(ts),
            "train_after_val_cutoff": round(float((ts >= cutoffs[0]).sum()) / n, 6),
            "train_after_test_cutoff": round(float((ts >= cutoffs[1]).sum()) / n, 6)}


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
    from ray.data.expressions import col

    t0 = time.time()
    d = cfg.data
    out = d.output_dir
    snapshot = new_snapshot()  # everything below is written here; manifest.json commits it at the end
    root = join(out, snapshot)
    events_path, catalog_path = d.events, d.catalog
    synthetic = None
    if events_path is None:
        from bundlerec.data.synthetic import generate

        raw_dir = join(root, "raw")
        if is_uri(raw_dir):  # generated on local disk, then copied to the object store
            import tempfile

            import pyarrow.fs as pafs

            with tempfile.TemporaryDirectory() as tmp:
                synthetic = generate(d.synthetic, tmp)
                pafs.copy_files(tmp, raw_dir)
        else:
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
        catalog, catalog_counts, rejected = catalog_lib.normalize_catalog(raw_catalog, catalog_columns, d.max_price)
        catalog_counts = {"input": len(raw_catalog), "kept": len(catalog), "quarantined": len(rejected),
                          **catalog_counts}
        if len(rejected):
            write_text(join(root, "quarantine", "catalog", "rows.jsonl"), rejected.to_json(orient="records", lines=True))
        log.info("prep: catalog %d items from %s (%d rows quarantined)", len(catalog), catalog_path, len(rejected))

    # ---- validate: every row is kept or quarantined with a reason. Then one shuffle brings all rows
    # of a user into one block: duplicates across files are caught there, and sessionization below
    # reads the same blocks.
    raw = read_dataset(events_path, d.format, encoding=d.encoding, delimiter=d.csv_delimiter,
                       include_paths=bool(d.event_type_by_file), columns_by_file=d.csv_columns_by_file)
    tagged = raw.map_batches(
        _tag, batch_format="pandas", batch_size=None,  # a block at a time: files may differ in columns
        fn_kwargs=dict(columns=d.columns, event_type_map=d.event_type_map, time_unit=d.time_unit,
                       event_type_constant=d.event_type_constant, event_type_by_file=d.event_type_by_file,
                       user_id_fallback=d.user_id_fallback,
                       catalog_ids=catalog_lib.catalog_ids(catalog), max_price=d.max_price,
                       max_time=pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=d.max_future_skew_hours)),
    ).repartition(d.num_shards, keys=["user_id"]).map_batches(
        _dedupe, batch_format="pandas", batch_size=None).materialize()
    n_input = tagged.count()
    bad = tagged.map_batches(_quarantined, batch_format="pyarrow")
    bad_reasons = bad.select_columns([REASON_COL]).to_pandas()
    reasons = {} if bad_reasons.empty else {
        str(k): int(v) for k, v in bad_reasons[REASON_COL].value_counts().items()}
    quarantine_dir = join(root, "quarantine", "events")
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
    items_dir = join(root, "items")
    items = ray.data.from_pandas(catalog).map_batches(
        catalog_lib.tokenize_batch, batch_format="pandas", batch_size=4096,
        fn_kwargs={"model_name": cfg.model.name_or_path, "max_tokens": d.item_max_tokens})
    items.repartition(1).write_parquet(items_dir)

    # ---- sessions -> sequences -> split examples (all rows of a user in one block, see above)
    index = catalog_lib.item_lookup(catalog)
    target_times = good.filter(expr=col("event_type") == d.target_event).select_columns(["event_time"]).to_pandas()
    cutoffs = global_cutoffs(target_times["event_time"].astype("datetime64[us, UTC]").astype("int64").to_numpy() / 1e6,
                             d.val_fraction, d.test_fraction) if len(target_times) else None
    examples = tagged.map_batches(
        _examples_udf, batch_format="pandas", batch_size=None,
        fn_kwargs=dict(item_index=index, gap_minutes=d.session_gap_minutes, history_len=d.max_history_len,
                       target_event=d.target_event, val_baskets=d.val_baskets, test_baskets=d.test_baskets,
                       cutoffs=cutoffs if d.split == "global_time" else None)).materialize()
    counts = {}
    for split in SPLITS:
        split_dir = join(root, "examples", split)
        reset_dir(split_dir)  # exists even when empty (no val split): readers get zero rows, not an error
        part = examples.map_batches(_split_rows, batch_format="pyarrow", fn_kwargs={"split": split})
        part.write_parquet(split_dir)
        counts[split] = part.count()
    split_report = _split_report(examples, d.split, cutoffs)
    log.info("prep: split %s", split_report)
    latest = examples.select_columns(["n_sessions"]).sum("n_sessions")
    cold = examples.map_batches(_split_rows, batch_format="pyarrow", fn_kwargs={"split": COLD}).count()
    if counts["train"] == 0 or counts["test"] == 0:
        raise PrepError(f"not enough baskets to train and test: {counts}. Users need >= 2 sessions with a "
                        f"'{d.target_event}' event (data.target_event).")
    if counts["val"] == 0:
        log.warning("prep: no validation examples (data.val_baskets=%d): training and promotion will refuse "
                    "this output, since they select on validation only", d.val_baskets)

    from bundlerec.data.catalog import _tokenizer, tokenizer_fingerprint

    schema_str = json.dumps({"examples": str(EXAMPLE_ARROW), "items": str(items.schema())}, sort_keys=True)
    t_hash = time.time()  # the snapshot's content hashes (inputs and outputs), timed on their own
    inputs = {"events": input_table(events_path, expand(events_path)),
              "catalog": input_table(catalog_path, expand(catalog_path) if catalog_path else [])}
    files = file_table(root)
    hash_seconds = time.time() - t_hash
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(),
        "events_path": events_path, "catalog_path": catalog_path, "synthetic": synthetic,
        "rows": {"input": n_input, "kept": n_good, "quarantined": q["quarantined"]},
        "quarantine": q, "catalog": {"items": len(catalog), **catalog_counts},
        "sessions": int(latest or 0), "users": counts["latest"],
        "examples": counts, "split": split_report,
        "baskets": {"cold_no_history": cold},  # baskets with no earlier event of their user: not examples
        "inputs": inputs,
        "snapshot": snapshot,
        "files": files,
        "schema_hash": hashlib.sha256(schema_str.encode()).hexdigest()[:16],
        "model": cfg.model.name_or_path, "tokenizer": cfg.model.name_or_path,
        "tokenizer_fingerprint": tokenizer_fingerprint(_tokenizer(cfg.model.name_or_path)),
        "item_max_tokens": d.item_max_tokens, "max_history_len": d.max_history_len,
        "config": to_dict(d),
        "seconds": round(time.time() - t0, 2),
        "hash_seconds": round(hash_seconds, 4),
    }
    commit(out, manifest)
    log.info("prep: done in %.1fs: %s (snapshot %s)", manifest["seconds"], counts, snapshot)
    return manifest
