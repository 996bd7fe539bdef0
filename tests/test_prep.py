"""Ray Data prep on a real local Ray cluster: synthetic input, malformed input, foreign (REES46) logs."""

import gzip
import json
import re

import pandas as pd
import pytest

from bundlerec.config import load_config
from bundlerec.data.snapshot import data_root
from bundlerec.data.prep import PrepError, run_prep

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_prep_on_synthetic_writes_splits_items_and_manifest(tiny_prep):
    cfg, m = tiny_prep
    out = cfg.data.output_dir
    assert m["rows"]["input"] == m["rows"]["kept"] > 0 and m["rows"]["quarantined"] == 0
    assert m["examples"]["train"] > 0 and m["examples"]["test"] > 0 and m["examples"]["latest"] == 300
    assert json.load(open(f"{out}/manifest.json"))["schema_hash"] == m["schema_hash"]
    items = pd.read_parquet(f"{data_root(out)}/items")
    assert len(items) == 120 and items.input_ids.map(len).max() <= cfg.data.item_max_tokens
    assert (items.item_idx.sort_values().to_numpy() == range(120)).all()
    test = pd.read_parquet(f"{data_root(out)}/examples/test")
    train = pd.read_parquet(f"{data_root(out)}/examples/train")
    # leakage: for every user the test basket is later than all of their training baskets
    last_train = train.groupby("user_id").target_time.max()
    joined = test.set_index("user_id").target_time.to_frame().join(last_train.rename("train_t"), how="inner")
    assert (joined.target_time > joined.train_t).all()
    # ... but not across users: prep measures how much of training lies after a global test cutoff
    split = m["split"]
    assert split["mode"] == "per_user" and split["train_examples"] == m["examples"]["train"]
    assert 0 < split["train_after_test_cutoff"] <= split["train_after_val_cutoff"] <= 1, split


def test_the_global_time_split_trains_on_nothing_after_its_cutoff(tiny_prep, tmp_path):
    from bundlerec.data.examples import load_split
    from tests.support import tiny_config

    m = run_prep(tiny_config(f"data.output_dir={tmp_path}/g", "data.split=global_time"))
    split = m["split"]
    assert split["mode"] == "global_time" and split["train_after_val_cutoff"] == 0.0, split
    val_cut, test_cut = pd.Timestamp(split["val_cutoff"]), pd.Timestamp(split["test_cutoff"])
    train, val = load_split(f"{tmp_path}/g", "train"), load_split(f"{tmp_path}/g", "val")
    assert len(train) and len(val) and (train.target_time < val_cut).all() and (val.target_time < test_cut).all()


def test_training_read_is_in_file_order_even_when_materialized(tiny_prep):
    """What makes training reproducible across Ray sessions: the train split, materialized as
    tiny.yaml and demo.yaml do, lists its rows in file order every time. Without preserve_order on
    the dataset's own context, the read that finished first came first, so which rank trained on which
    rows changed between runs (the two outcomes the resume comparisons of test_train.py flipped on)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bundlerec.data.examples import read_examples

    path = f"{data_root(tiny_prep[0].data.output_dir)}/examples/train"
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
    # written before failing, in the run's (never committed) snapshot that the error names: nothing lost
    q = pd.read_parquet(re.search(r"kept in (\S+) with", str(e.value)).group(1))
    assert len(q) == 7
    m = run_prep(load_config(None, base + ["data.max_bad_fraction=0.6"]))
    assert m["quarantine"]["by_reason"] == {"unparseable_time": 1, "unknown_event_type": 1, "missing_user_id": 1,
                                            "missing_item_id": 1, "negative_price": 1, "item_not_in_catalog": 1,
                                            "unparseable_price": 1}
    assert m["rows"] == {"input": 14, "kept": 7, "quarantined": 7}
    q = pd.read_parquet(f"{data_root(str(tmp_path / 'out'))}/quarantine/events")
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
    q = pd.read_parquet(f"{data_root(str(tmp_path / 'out'))}/quarantine/events")
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
    items = pd.read_parquet(f"{data_root(str(tmp_path / 'out'))}/items")
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
    items = pd.read_parquet(f"{data_root(str(tmp_path / 'o3'))}/items")
    assert set(items.item_id) == {"café-0", "café-1", "café-2"}  # decoded, not mangled


def test_prep_commits_whole_snapshots_and_accounts_for_every_input(ray_cluster, tmp_path):
    """Every input file (hashed) and skipped file, catalog row and basket is accounted for; a failed
    re-run leaves the committed snapshot in use; two concurrent preps into one folder both complete
    and the manifest names one whole snapshot; a damaged file is caught before training."""
    import hashlib
    import os
    import threading

    from bundlerec.data.examples import load_split
    from bundlerec.data.snapshot import PrepIntegrityError, verify

    ev = tmp_path / "events"
    ev.mkdir()
    rows = ["event_time,event_type,user_id,item_id"]
    for u in range(6):  # each user: a first-ever purchase (cold: nothing before it), then 3 visits
        rows.append(f"2026-01-01T09:00:00Z,purchase,u{u},a")
        for day, item in ((2, "b"), (3, "c"), (4, "a")):
            rows += [f"2026-01-0{day}T10:00:00Z,view,u{u},{item}", f"2026-01-0{day}T10:01:00Z,purchase,u{u},{item}"]
    (ev / "part-0.csv").write_text("\n".join(rows) + "\n")
    (ev / "_SUCCESS").write_text("")  # a Spark marker: not read, but recorded
    pd.DataFrame({"item_id": ["a", "b", "c", None, "b", "d"], "title": ["apple", "old b", "cherry", "x", "banana", "dear"],
                  "price": ["1.0", "2.0", "3.0", "1.0", "2.5", "inf"]}).to_json(  # text prices, as scraped
        tmp_path / "catalog.jsonl", orient="records", lines=True)
    out = str(tmp_path / "out")
    base = [f"data.events={ev}", f"data.catalog={tmp_path}/catalog.jsonl", f"data.output_dir={out}",
            "data.num_shards=1", "data.val_baskets=1"]
    m = run_prep(load_config(None, base))
    assert m["catalog"] == {"items": 3, "input": 6, "kept": 3, "quarantined": 3, "catalog_missing_item_id": 1,
                            "catalog_duplicate_item_id": 1, "catalog_bad_price": 1}
    rejected = pd.read_json(f"{data_root(out)}/quarantine/catalog/rows.jsonl", lines=True)
    assert sorted(rejected.quarantine_reason) == ["catalog_bad_price", "catalog_duplicate_item_id",
                                                  "catalog_missing_item_id"]
    assert json.loads(rejected.set_index("quarantine_reason").loc["catalog_duplicate_item_id", "raw"])["title"] == "old b"
    assert m["baskets"]["cold_no_history"] == 6
    assert m["examples"]["train"] + m["examples"]["val"] + m["examples"]["test"] == 6 * 3  # one item per basket
    f = m["inputs"]["events"]["files"]
    raw = (ev / "part-0.csv").read_bytes()
    assert [(x["size"], x["sha256"]) for x in f] == [(len(raw), hashlib.sha256(raw).hexdigest())]
    assert [os.path.basename(x["path"]) for x in m["inputs"]["events"]["skipped"]] == ["_SUCCESS"]
    assert m["inputs"]["catalog"]["files"][0]["size"] == os.path.getsize(tmp_path / "catalog.jsonl")
    verify(out)
    first = m["snapshot"]
    train = load_split(out, "train")

    # a re-run that fails (every event row is bad now) leaves the committed snapshot in use
    (ev / "part-1.csv").write_text("event_time,event_type,user_id,item_id\n" + "\n".join(
        f"never,view,u{i},a" for i in range(200)) + "\n")
    with pytest.raises(PrepError):
        run_prep(load_config(None, base))
    assert json.load(open(f"{out}/manifest.json"))["snapshot"] == first
    pd.testing.assert_frame_equal(load_split(out, "train"), train)
    verify(out)
    (ev / "part-1.csv").unlink()

    # two preps into one folder at once: both complete, the manifest names one whole snapshot
    done, errors = [], []

    def prep(extra):
        try:
            done.append(run_prep(load_config(None, base + extra))["snapshot"])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=prep, args=(x,)) for x in (["data.val_baskets=0"], ["data.val_baskets=1"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    current = json.load(open(f"{out}/manifest.json"))
    assert current["snapshot"] in done and len(set(done)) == 2
    verify(out)
    n_val = len(load_split(out, "val"))
    assert n_val == current["examples"]["val"]  # the files are the ones this manifest counted
    # committed snapshots older than the previous one are deleted; the failed run's is left (reported)
    names = {f"snapshots/{n}" for n in os.listdir(f"{out}/snapshots")}
    assert first not in names and {current["snapshot"], *current["previous_snapshots"]} <= names
    assert len(current["previous_snapshots"]) == 1 and len(names) == 3

    # damage after the commit is caught before training
    shard = sorted((tmp_path / "out" / current["snapshot"] / "examples" / "train").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(PrepIntegrityError, match="examples/train"):
        verify(out)
