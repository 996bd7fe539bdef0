"""Bring your own data: the shipped column mappings (jobs/configs/*.yaml) on small samples written here
in each dataset's real published format (no downloads), through the real prep on a local Ray cluster."""

import gzip
import json

import pandas as pd
import pytest


from bundlerec.config import load_config
from bundlerec.data.snapshot import data_root
from bundlerec.data.prep import run_prep
from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

USERS, BASKETS = 6, 4
ITEMS = [(f"B0{i:04d}", f"Sono X{i} headphones" if i % 2 else f"Acme cable {i}", 10.0 + i, f"cat{i % 3}")
         for i in range(10)]


def _baskets():
    """(user, basket, day, viewed item, bought item) for USERS users with BASKETS baskets each."""
    for u in range(USERS):
        for b in range(BASKETS):
            yield u, b, 1 + u + 5 * b, ITEMS[(u + b) % 10], ITEMS[(u + b + 3) % 10]


def _cfg(name: str, tmp_path, *extra):
    return load_config(str(ROOT / f"jobs/configs/{name}.yaml"),
                       [f"data.output_dir={tmp_path}/out", "data.num_shards=1", *extra])


def test_retailrocket_events_and_item_properties(ray_cluster, tmp_path):
    ev = []
    for u, b, day, seen, bought in _baskets():
        t = 1_433_221_332_000 + day * 86_400_000 + u * 1000
        ev += [(t, 1000 + u, "view", seen[0][2:], ""), (t + 60_000, 1000 + u, "addtocart", bought[0][2:], ""),
               (t + 120_000, 1000 + u, "transaction", bought[0][2:], f"{u}{b}")]
    pd.DataFrame(ev, columns=["timestamp", "visitorid", "event", "itemid", "transactionid"]).to_csv(
        tmp_path / "events.csv", index=False)
    props = []
    for item_id, _, price, cat in ITEMS:
        iid = item_id[2:]
        props += [(1_433_000_000_000, iid, "categoryid", "999"), (1_434_000_000_000, iid, "categoryid", cat[-1] + "16"),
                  (1_434_000_000_000, iid, "790", f"n{price * 1000:.3f}"), (1_434_000_000_000, iid, "888", "1154859 n48.000")]
    half = len(props) // 2
    for part, rows in (("1", props[:half]), ("2", props[half:])):
        pd.DataFrame(rows, columns=["timestamp", "itemid", "property", "value"]).to_csv(
            tmp_path / f"item_properties_part{part}.csv", index=False)
    m = run_prep(_cfg("retailrocket", tmp_path, f"data.events={tmp_path}/events.csv",
                      f"data.catalog={tmp_path}/item_properties_part*.csv"))
    assert m["rows"] == {"input": len(ev), "kept": len(ev), "quarantined": 0}
    items = pd.read_parquet(f"{data_root(str(tmp_path / 'out'))}/items").set_index("item_id")
    assert len(items) == 10
    # the latest categoryid wins (not the older 999); the price is the number in "n13000.000" (as stored)
    assert items.loc["0003", "category"] == "016" and items.loc["0003", "price"] == pytest.approx(13000.0)
    assert "888=1154859 n48.000" in items.loc["0003", "text"] and "item 0003" not in items.loc["0003", "text"]
    assert m["examples"]["test"] == USERS and m["examples"]["val"] == USERS


def test_amazon_2018_reviews_as_purchases_with_metadata(ray_cluster, tmp_path):
    reviews = [{"overall": 5.0, "verified": True, "reviewTime": "01 1, 2016", "reviewerID": f"A{u:03d}XYZ",
                "asin": bought[0], "reviewerName": "x", "reviewText": "fine", "summary": "ok",
                "unixReviewTime": 1_451_606_400 + day * 86_400, "style": {"Color:": " Black"}}
               for u, _, day, _, bought in _baskets()]
    meta = [{"category": ["Electronics", "Headphones" if "Sono" in title else "Cables"],
             "description": [f"{title} for everyday use.", "Two-year warranty."], "title": title, "brand": title.split()[0],
             "price": f"${price:,.2f}", "asin": asin, "also_buy": ["B0XXXX"], "rank": "1,234 in Electronics"}
            for asin, title, price, _ in ITEMS]
    for name, rows in (("reviews.json.gz", reviews), ("meta.json.gz", meta)):
        with gzip.open(tmp_path / name, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    m = run_prep(_cfg("amazon2018", tmp_path, f"data.events={tmp_path}/reviews.json.gz",
                      f"data.catalog={tmp_path}/meta.json.gz"))
    assert m["rows"] == {"input": len(reviews), "kept": len(reviews), "quarantined": 0}
    items = pd.read_parquet(f"{data_root(str(tmp_path / 'out'))}/items").set_index("item_id")
    t = items.loc["B00001", "text"]
    assert items.loc["B00001", "price"] == pytest.approx(11.0) and "Electronics > Headphones" in t
    assert t.startswith("Sono X1 headphones") and "everyday use" in t
    assert m["examples"]["test"] == USERS  # every review a purchase basket


def test_amazon_2023_reviews_and_metadata(ray_cluster, tmp_path):
    reviews = [{"rating": 4.0, "title": "good", "text": "works", "images": [], "asin": bought[0] + "V",
                "parent_asin": bought[0], "user_id": f"AE{u:04d}", "timestamp": 1_588_687_728_923 + day * 86_400_000,
                "helpful_vote": 0, "verified_purchase": True} for u, _, day, _, bought in _baskets()]
    meta = [{"main_category": "All Electronics", "title": title, "average_rating": 4.5, "rating_number": 10,
             "features": ["wireless"], "description": [f"About {title}."], "price": price if i % 4 else None,
             "images": [{"large": "https://example.invalid/x.jpg"}], "videos": [], "store": "SonoStore",
             "categories": ["Electronics", "Audio"], "details": {"Color": "Black"}, "parent_asin": asin,
             "bought_together": None} for i, (asin, title, price, _) in enumerate(ITEMS)]
    for name, rows in (("reviews.jsonl", reviews), ("meta.jsonl", meta)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = run_prep(_cfg("amazon2023", tmp_path, f"data.events={tmp_path}/reviews.jsonl",
                      f"data.catalog={tmp_path}/meta.jsonl"))
    assert m["rows"]["quarantined"] == 0 and m["rows"]["kept"] == len(reviews)
    items = pd.read_parquet(f"{data_root(str(tmp_path / 'out'))}/items").set_index("item_id")
    assert pd.isna(items.loc["B00000", "price"]) and items.loc["B00001", "price"] == pytest.approx(11.0)
    assert "SonoStore" in items.loc["B00001", "text"] and "Electronics > Audio" in items.loc["B00001", "text"]
    assert m["examples"]["test"] == USERS


def test_diginetica_one_file_per_event_type(ray_cluster, tmp_path):
    views, buys = [], []
    for u, b, day, seen, bought in _baskets():
        sid, date = 100 * u + b, f"2016-05-{day:02d}"
        views.append((sid, 10 + u, seen[0][2:], 1000, date))
        buys.append((sid, 10 + u, 2000, date, 900 + sid, bought[0][2:]))
    views += [(9000 + i, "", ITEMS[i][0][2:], 10, "2016-05-01") for i in range(3)]  # anonymous sessions
    pd.DataFrame(views, columns=["sessionId", "userId", "itemId", "timeframe", "eventdate"]).to_csv(
        tmp_path / "train-item-views.csv", sep=";", index=False)
    pd.DataFrame(buys, columns=["sessionId", "userId", "timeframe", "eventdate", "ordernumber", "itemId"]).to_csv(
        tmp_path / "train-purchases.csv", sep=";", index=False)
    (tmp_path / "train-queries.csv").write_text("queryId;sessionId;userId;timeframe;duration;eventdate\n1;1;;0;5;2016-05-01\n")
    pd.DataFrame([(a[2:], 7, ",".join(str(ord(c)) for c in t[:4])) for a, t, _, _ in ITEMS],
                 columns=["itemId", "pricelog2", "product.name.tokens"]).to_csv(tmp_path / "products.csv", sep=";",
                                                                                 index=False)
    m = run_prep(_cfg("diginetica", tmp_path, f"data.events={tmp_path}/train-[ip]*.csv",
                      f"data.catalog={tmp_path}/products.csv"))
    assert m["rows"]["input"] == len(views) + len(buys)  # the queries file is not read
    assert m["quarantine"]["by_reason"] == {}  # anonymous sessions are their own users: the whole log is read
    root = data_root(str(tmp_path / "out"))
    users = set().union(*(pd.read_parquet(f"{root}/examples/{s}").user_id for s in ("train", "val", "test")))
    assert {str(10 + u) for u in range(USERS)} <= users  # logged-in shoppers keep their userId
    assert len(pd.read_parquet(f"{root}/examples/test")) > 0 and m["catalog"]["items"] == 10
    assert m["split"]["mode"] == "global_time" and m["split"]["train_after_val_cutoff"] == 0
    items = pd.read_parquet(f"{data_root(str(tmp_path / 'out'))}/items")
    assert items.title.str.contains(",").all()  # the hashed name tokens are the title


def test_yoochoose_headerless_files_with_the_session_as_the_user(ray_cluster, tmp_path):
    """yoochoose-clicks.dat / yoochoose-buys.dat as published: no header row, no user column, ISO times
    with milliseconds; the -test.dat file is not read."""
    clicks, buys = [], []
    for u, b, day, seen, bought in _baskets():
        sid = 100 * u + b
        clicks.append(f"{sid},2014-04-{day:02d}T10:51:09.277Z,214{seen[0][2:]},{'S' if u % 2 else 0}")
        clicks.append(f"{sid},2014-04-{day:02d}T10:52:30.101Z,214{bought[0][2:]},0")
        buys.append(f"{sid},2014-04-{day:02d}T10:55:00.000Z,214{bought[0][2:]},{int(bought[2] * 100)},1")
    (tmp_path / "yoochoose-clicks.dat").write_text("\n".join(clicks) + "\n")
    (tmp_path / "yoochoose-buys.dat").write_text("\n".join(buys) + "\n")
    (tmp_path / "yoochoose-test.dat").write_text("1,2014-04-01T00:00:00.000Z,214000,0\n")
    m = run_prep(_cfg("yoochoose", tmp_path, f"data.events={tmp_path}/yoochoose-[cb]*.dat"))
    assert m["rows"]["input"] == len(clicks) + len(buys) and m["quarantine"]["by_reason"] == {}
    assert m["split"]["mode"] == "global_time" and m["split"]["train_after_val_cutoff"] == 0 and m["catalog"]["items"] == 10
    root = data_root(str(tmp_path / "out"))
    test = pd.read_parquet(f"{root}/examples/test")
    assert len(test) > 0 and set(test.user_id) <= {str(100 * u + b) for u in range(USERS) for b in range(BASKETS)}
    train = pd.read_parquet(f"{root}/examples/train")
    assert train.target_time.max() < test.target_time.min()  # nothing after the cutoff trains
