"""Ray Data prep on a real local Ray cluster: synthetic input, malformed input, foreign (REES46) logs."""

import gzip
import json

import pandas as pd
import pytest

from bundlerec.config import load_config
from bundlerec.data.prep import PrepError, run_prep

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_prep_on_synthetic_writes_splits_items_and_manifest(tiny_prep):
    cfg, m = tiny_prep
    out = cfg.data.output_dir
    assert m["rows"]["input"] == m["rows"]["kept"] > 0 and m["rows"]["quarantined"] == 0
    assert m["examples"]["train"] > 0 and m["examples"]["test"] > 0 and m["examples"]["latest"] == 300
    assert json.load(open(f"{out}/manifest.json"))["schema_hash"] == m["schema_hash"]
    items = pd.read_parquet(f"{out}/items")
    assert len(items) == 120 and items.input_ids.map(len).max() <= cfg.data.item_max_tokens
    assert (items.item_idx.sort_values().to_numpy() == range(120)).all()
    test = pd.read_parquet(f"{out}/examples/test")
    train = pd.read_parquet(f"{out}/examples/train")
    # leakage: for every user the test basket is later than all of their training baskets
    last_train = train.groupby("user_id").target_time.max()
    joined = test.set_index("user_id").target_time.to_frame().join(last_train.rename("train_t"), how="inner")
    assert (joined.target_time > joined.train_t).all()


def test_training_read_is_in_file_order_even_when_materialized(tiny_prep):
    """What makes training reproducible across Ray sessions: the train split, materialized as
    tiny.yaml and demo.yaml do, lists its rows in file order every time. Without preserve_order on
    the dataset's own context, the read that finished first came first, so which rank trained on which
    rows changed between runs (the two outcomes the resume comparisons of test_train.py flipped on)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bundlerec.data.examples import read_examples

    path = f"{tiny_prep[0].data.output_dir}/examples/train"
    files = pq.ParquetDataset(path).files
    assert len(files) >= 2  # else there is no order to get wrong
    want = pa.concat_tables([pq.read_table(f, columns=["user_id", "target_time"]) for f in files])
    want = list(zip(want["user_id"].to_pylist(), want["target_time"].to_pylist()))
    for _ in range(6):
        got = read_examples(tiny_prep[0].data.output_dir, "train", True).materialize().to_pandas()
        assert list(zip(got.user_id, got.target_time)) == want


def _write_malformed(d):
    rows = [
        "event_time,event_type,user_id,item_id,price",
        "2026-01-01T10:00:00Z,view,u1,a,1.0",
        "2026-01-01T10:01:00Z,view,u1,b,2.0",
        "2026-01-01T10:02:00Z,purchase,u1,b,2.0",
        "2026-01-02T10:00:00Z,view,u1,a,1.0",
        "2026-01-02T10:01:00Z,purchase,u1,a,1.0",
        "2026-01-03T10:00:00Z,view,u1,c,3.0",
        "2026-01-03T10:01:00Z,purchase,u1,c,3.0",
        "yesterday-ish,view,u1,a,1.0",                 # unparseable_time
        "2026-01-01T10:00:00Z,teleport,u1,a,1.0",      # unknown_event_type
        "2026-01-01T10:00:00Z,view,,a,1.0",            # missing_user_id
        "2026-01-01T10:00:00Z,view,u1,,1.0",           # missing_item_id
        "2026-01-01T10:00:00Z,view,u1,a,-5",           # negative_price
        "2026-01-01T10:00:00Z,view,u1,ghost,1.0",      # item_not_in_catalog
        "2026-01-01T10:00:00Z,view,u1,a,cheap",        # unparseable_price
    ]
    with gzip.open(d / "events.csv.gz", "wt") as f:
        f.write("\n".join(rows) + "\n")
    pd.DataFrame({"item_id": ["a", "b", "c"], "title": ["apple", "banana", "cherry"], "category": ["f"] * 3,
                  "brand": ["x"] * 3, "price": [1.0, 2.0, 3.0]}).to_json(d / "catalog.jsonl", orient="records", lines=True)


def test_prep_quarantines_malformed_rows_with_exact_counts(ray_cluster, tmp_path):
    _write_malformed(tmp_path)
    base = [f"data.events={tmp_path}/events.csv.gz", f"data.catalog={tmp_path}/catalog.jsonl",
            f"data.output_dir={tmp_path}/out", "data.num_shards=1", "data.val_baskets=0"]
    with pytest.raises(PrepError, match="max_bad_fraction") as e:
        run_prep(load_config(None, base))  # 7 of 14 rows are bad: far above the 5% default
    assert "quarantine" in str(e.value)
    q = pd.read_parquet(f"{tmp_path}/out/quarantine/events")  # written before failing: nothing lost
    assert len(q) == 7
    m = run_prep(load_config(None, base + ["data.max_bad_fraction=0.6"]))
    assert m["quarantine"]["by_reason"] == {"unparseable_time": 1, "unknown_event_type": 1, "missing_user_id": 1,
                                            "missing_item_id": 1, "negative_price": 1, "item_not_in_catalog": 1,
                                            "unparseable_price": 1}
    assert m["rows"] == {"input": 14, "kept": 7, "quarantined": 7}
    q = pd.read_parquet(f"{tmp_path}/out/quarantine/events")
    assert json.loads(q.set_index("quarantine_reason").loc["unparseable_time", "raw"])["event_time"] == "yesterday-ish"
    assert m["examples"]["test"] == 1 and m["examples"]["train"] == 2


def test_prep_quarantines_duplicates_across_files(ray_cluster, tmp_path):
    """A log file ingested twice in part (a replayed batch): the copies live in another file and
    block, so only prep's per-user pass can see them; they are quarantined, not counted twice."""
    header = "event_time,event_type,user_id,item_id,price\n"
    rows = [f"2026-01-0{day}T10:0{k}:00Z,{t},{u},{it},1.0"
            for u in ("u1", "u2") for day in (1, 2, 3) for k, (t, it) in enumerate([("view", "a"), ("purchase", "b")])]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs/part-1.csv").write_text(header + "\n".join(rows) + "\n")
    (tmp_path / "logs/part-2.csv").write_text(header + "\n".join(rows[:3] + rows[7:9]) + "\n")  # replayed
    pd.DataFrame({"item_id": ["a", "b"], "title": ["apple", "banana"], "category": ["f"] * 2, "brand": ["x"] * 2,
                  "price": [1.0, 1.0]}).to_json(tmp_path / "catalog.jsonl", orient="records", lines=True)
    m = run_prep(load_config(None, [f"data.events={tmp_path}/logs", f"data.catalog={tmp_path}/catalog.jsonl",
                                    f"data.output_dir={tmp_path}/out", "data.num_shards=2", "data.val_baskets=0",
                                    "data.max_bad_fraction=0.5"]))
    assert m["rows"] == {"input": 17, "kept": 12, "quarantined": 5}
    assert m["quarantine"]["by_reason"] == {"duplicate_event": 5}
    q = pd.read_parquet(f"{tmp_path}/out/quarantine/events")
    assert len(q) == 5 and set(q.quarantine_reason) == {"duplicate_event"}
    assert {json.loads(r)["user_id"] for r in q.raw} == {"u1", "u2"}
    assert m["examples"]["test"] == 2 and m["examples"]["train"] == 4  # as if each event came once


def test_prep_maps_rees46_logs_without_code(ray_cluster, tmp_path):
    rows = []
    for u in range(6):
        for day in range(3):
            t = f"2019-10-0{day + 1} 0{u}:00:00 UTC"
            rows.append((t, "view", 1000 + day, "electronics.smartphone", "acme", 99.5, 500 + u, f"s{u}{day}"))
            rows.append((t.replace(":00:00", ":05:00"), "cart", 2000 + day, "electronics.audio.headphone", "sono", 25.0, 500 + u, f"s{u}{day}"))
            rows.append((t.replace(":00:00", ":06:00"), "remove_from_cart", 2000 + day, "electronics.audio.headphone", "sono", 25.0, 500 + u, f"s{u}{day}"))
            rows.append((t.replace(":00:00", ":07:00"), "purchase", 2000 + day, "electronics.audio.headphone", "sono", 25.0, 500 + u, f"s{u}{day}"))
    df = pd.DataFrame(rows, columns=["event_time", "event_type", "product_id", "category_code", "brand", "price",
                                     "user_id", "user_session"])
    (tmp_path / "logs").mkdir()
    df.iloc[:36].to_csv(tmp_path / "logs/2019-Oct-a.csv.gz", index=False)
    df.iloc[36:].to_csv(tmp_path / "logs/2019-Oct-b.csv.gz", index=False)
    cfg = load_config("jobs/configs/rees46.yaml", [f"data.events={tmp_path}/logs/*.csv.gz",
                                                   f"data.output_dir={tmp_path}/out", "data.num_shards=1"])
    m = run_prep(cfg)
    assert m["rows"]["input"] == 72 and m["quarantine"]["by_reason"] == {"ignored_event_type": 18}
    assert m["quarantine"]["bad_fraction"] == 0.0  # ignored types are recorded, not counted as bad
    items = pd.read_parquet(f"{tmp_path}/out/items")
    assert len(items) == 6 and items.text.str.contains("electronics > audio > headphone").any()
    assert m["examples"]["test"] == 6


def test_prep_names_the_file_for_truncated_parquet_and_bad_encoding(ray_cluster, tmp_path):
    from bundlerec.data.schema import SchemaError

    rows = [("2026-01-0%dT10:00:00Z" % (i + 1), "purchase" if i % 2 else "view", "u1", "café-%d" % (i % 3))
            for i in range(8)]
    df = pd.DataFrame(rows, columns=["event_time", "event_type", "user_id", "item_id"])
    # truncated Parquet: a clear error naming the file, before any Ray task runs
    (tmp_path / "pq").mkdir()
    df.to_parquet(tmp_path / "pq/good.parquet")
    raw = (tmp_path / "pq/good.parquet").read_bytes()
    (tmp_path / "pq/cut.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SchemaError, match=r"cut\.parquet: not a readable Parquet file"):
        run_prep(load_config(None, [f"data.events={tmp_path}/pq", f"data.output_dir={tmp_path}/o1"]))
    # a Latin-1 CSV read as UTF-8: the file and byte offset are named; with data.encoding it is read
    (tmp_path / "latin.csv").write_bytes(df.to_csv(index=False).encode("latin-1"))
    with pytest.raises(SchemaError, match=r"latin\.csv: not valid utf-8 at byte \d+.*data\.encoding"):
        run_prep(load_config(None, [f"data.events={tmp_path}/latin.csv", f"data.output_dir={tmp_path}/o2"]))
    m = run_prep(load_config(None, [f"data.events={tmp_path}/latin.csv", f"data.output_dir={tmp_path}/o3",
                                    "data.encoding=latin-1", "data.num_shards=1", "data.val_baskets=0"]))
    assert m["rows"]["input"] == 8 and m["rows"]["quarantined"] == 0
    items = pd.read_parquet(f"{tmp_path}/o3/items")
    assert set(items.item_id) == {"café-0", "café-1", "café-2"}  # decoded, not mangled
